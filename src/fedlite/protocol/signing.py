"""Ed25519 signatures on everything the aggregator broadcasts (rounds, models, weights, deployments).

A signed payload is an envelope around the original bytes:

    b"FLS" | version u8 (= 1) | key id (8 bytes) | signature (64 bytes) | payload

The signature covers ``topic (UTF-8) | 0x00 | payload``, so a signed message cannot be replayed on
another topic. The key id is the first 8 bytes of the sha256 of the raw 32-byte public key; agents pin
one or more public keys (several during a key rotation) and refuse unsigned, unknown-key or forged
messages. Agents verify with libsodium (PyNaCl, `fedlite.protocol.ed25519`: no `cryptography` resident on a device);
the aggregator signs with `cryptography`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from fedlite.protocol import ed25519
from fedlite.protocol.errors import ProtocolError

MAGIC = b"FLS\x01"
_KEY_ID_LEN, _SIG_LEN = 8, 64
_PREFIX = len(MAGIC) + _KEY_ID_LEN + _SIG_LEN
Check = Callable[[bytes, bytes, bytes], bool]  # (raw public key, signature, signed bytes) -> valid


class SignatureError(ProtocolError):
    """A broadcast that is unsigned, signed by a key this device does not trust, or forged."""


def key_id(public_raw: bytes) -> bytes:
    return hashlib.sha256(public_raw).digest()[:_KEY_ID_LEN]


def _signed_bytes(topic: str, payload: bytes) -> bytes:
    return topic.encode() + b"\0" + payload


class Signer:
    """The aggregator's private key."""

    def __init__(self, private_key: object) -> None:
        from cryptography.hazmat.primitives import serialization

        self._key = private_key
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = key_id(raw)

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the signing key {path}: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return cls(key)

    def sign(self, topic: str, payload: bytes) -> bytes:
        return MAGIC + self.key_id + self._key.sign(_signed_bytes(topic, payload)) + payload

    def verifier(self) -> Verifier:
        """A verifier trusting this key alone (aggregators of one federation checking each other)."""
        return Verifier([self._key.public_key()], check=openssl_verify)


class Verifier:
    """The public keys a device trusts (raw 32-byte Ed25519 keys, or `cryptography` public-key objects)."""

    def __init__(self, public_keys: list[object], check: Check = ed25519.verify) -> None:
        """`check(public_raw, signature, message)`: libsodium's check on a device, or OpenSSL's on a server."""
        self._check = check
        self._keys: dict[bytes, bytes] = {}
        for key in public_keys:
            raw = key if isinstance(key, bytes) else _raw_public(key)
            self._keys[key_id(raw)] = raw

    @classmethod
    def from_files(cls, paths: list[str]) -> Verifier:
        return cls([load_public_key(p) for p in paths])

    def verify(self, topic: str, envelope: bytes) -> bytes:
        """The payload inside a valid envelope; SignatureError otherwise."""
        if len(envelope) < _PREFIX or not envelope.startswith(MAGIC):
            raise SignatureError("unsigned", f"message on {topic} is not signed")
        kid = envelope[len(MAGIC) : len(MAGIC) + _KEY_ID_LEN]
        key = self._keys.get(kid)
        if key is None:
            raise SignatureError("unknown_key", f"message on {topic} is signed by untrusted key {kid.hex()}")
        signature, payload = envelope[len(MAGIC) + _KEY_ID_LEN : _PREFIX], envelope[_PREFIX:]
        if not self._check(key, signature, _signed_bytes(topic, payload)):
            raise SignatureError("forged", f"message on {topic} has an invalid signature")
        return payload


def openssl_verify(public_raw: bytes, signature: bytes, message: bytes) -> bool:
    """`cryptography`'s Ed25519 check (OpenSSL): fast, for the aggregator, where it is loaded anyway."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
    except InvalidSignature:
        return False
    return True


def _raw_public(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)  # type: ignore[attr-defined]


def load_public_key(path: str | Path) -> bytes:
    """The raw 32 bytes of the Ed25519 public key in a PEM file; ValueError naming the file otherwise."""
    try:
        return ed25519.public_key_from_pem(Path(path).read_bytes())
    except ed25519.BadPublicKey as exc:
        raise ValueError(f"{path} is not an Ed25519 public key: {exc}") from None
    except OSError as exc:
        raise ValueError(f"cannot load the public key {path}: {exc}") from None


def generate_keypair(directory: str | Path, name: str = "aggregator") -> tuple[Path, Path]:
    """Write `<name>.key` (PEM, 0600) and `<name>.pub` (PEM) into `directory`; refuse to overwrite."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    if private_path.exists():
        raise FileExistsError(f"{private_path} exists; move it away first to make a new key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path
