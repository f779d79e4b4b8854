"""Masks in Z_{2^k} expanded from a 32-byte seed with ChaCha20 (a cryptographic PRG; numpy's generators are not)."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_NONCE = bytes(16)  # ChaCha20's 16-byte nonce (counter included); each seed is used for one mask only


def mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """`length` uniform integers in [0, 2^bits), uint64 (bits <= 32: one 32-bit keystream word each)."""
    if not 1 <= bits <= 32:
        raise ValueError(f"mask bits must be 1..32, not {bits}")
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor().update(bytes(4 * length))
    words = np.frombuffer(stream, dtype="<u4").astype(np.uint64)
    return words & np.uint64((1 << bits) - 1)
