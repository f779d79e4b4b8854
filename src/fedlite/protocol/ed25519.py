"""Ed25519 signature checks for a lean device process: libsodium's (PyNaCl), with the public key read from its
PEM file by hand.

An agent only verifies; `cryptography` for that keeps about 10 MiB resident (its Rust module and the OpenSSL
linked into it), PyNaCl about 2.5 MiB. libsodium's check is strict: a signature whose S is not below the group
order, or a small-order R or public key, is refused.
"""

from __future__ import annotations

import base64

# The SubjectPublicKeyInfo DER prefix of an Ed25519 key (OID 1.3.101.112), followed by the 32 raw bytes
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


class BadPublicKey(ValueError):
    """Bytes that are not an Ed25519 public key."""


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether `signature` (64 bytes) is `public_key`'s (32 bytes) over `message`."""
    from nacl.exceptions import CryptoError
    from nacl.signing import VerifyKey

    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        VerifyKey(public_key).verify(message, signature)
    except (CryptoError, ValueError, TypeError):
        return False
    return True


def public_key_from_pem(pem: bytes) -> bytes:
    """The 32 raw bytes of a PEM "PUBLIC KEY" (SubjectPublicKeyInfo) holding an Ed25519 key; BadPublicKey if not."""
    text = pem.decode("ascii", "replace").strip()
    head, tail = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
    if not text.startswith(head) or not text.endswith(tail):
        raise BadPublicKey("not a PEM public key (expected -----BEGIN PUBLIC KEY-----)")
    try:
        der = base64.b64decode("".join(text[len(head):-len(tail)].split()), validate=True)
    except ValueError:
        raise BadPublicKey("the PEM body is not base64") from None
    if len(der) != len(SPKI_PREFIX) + 32 or not der.startswith(SPKI_PREFIX):
        raise BadPublicKey("not an Ed25519 public key")
    raw = der[len(SPKI_PREFIX):]
    from nacl.bindings import crypto_core_ed25519_is_valid_point

    if not crypto_core_ed25519_is_valid_point(raw):
        raise BadPublicKey("not a point on the Ed25519 curve (or one of small order)")
    return raw
