"""Per-round key pairs, agreed secrets and the authenticated encryption of shares (X25519, HKDF-SHA256,
ChaCha20-Poly1305, all from `cryptography`).

Each device makes two X25519 key pairs per round: one (`c`) to agree the key that encrypts the shares it sends a
neighbour, one (`s`) to agree the seed of their pairwise mask. Agreed secrets go through HKDF with a label per use
and the round's session, so a key never serves two purposes or two rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PUBLIC_KEY_BYTES = 32
_RAW = {"encoding": serialization.Encoding.Raw, "format": serialization.PublicFormat.Raw}
_NONCE = bytes(12)  # each derived key encrypts one message: a fixed nonce is safe


class KeyError_(ValueError):
    """A public key that is not one, or a ciphertext that does not authenticate."""


@dataclass(frozen=True)
class KeyPair:
    private: X25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_secret(cls, secret: bytes) -> KeyPair:
        return cls(X25519PrivateKey.from_private_bytes(secret))

    @property
    def public(self) -> bytes:
        return self.private.public_key().public_bytes(**_RAW)

    @property
    def secret(self) -> bytes:
        """The raw private key (32 bytes): what is secret-shared so that a drop-out's masks can be removed."""
        return self.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())

    def agree(self, peer_public: bytes, label: str, context: bytes) -> bytes:
        """A 32-byte secret shared with the owner of `peer_public`, for `label` and `context` only."""
        if len(peer_public) != PUBLIC_KEY_BYTES:
            raise KeyError_(f"an X25519 public key is {PUBLIC_KEY_BYTES} bytes, not {len(peer_public)}")
        try:
            shared = self.private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # e.g. a low-order point: the exchange gives all zeros
            raise KeyError_(f"unusable public key: {exc}") from None
        return derive(shared, label, context)


def derive(material: bytes, label: str, context: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"fedlite-secagg/" + label.encode() + b"/" + context).derive(material)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_NONCE, plaintext, associated)


def open_sealed(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE, ciphertext, associated)
    except InvalidTag:
        raise KeyError_("the ciphertext does not authenticate (tampered, or not for this recipient)") from None
