"""A public random rotation before quantization (randomized Hadamard, blockwise): it spreads an update's energy
evenly over the coordinates, so a per-coordinate clamp near a few C / sqrt(block) almost never bites (Suresh et al.,
"Distributed Mean Estimation with Limited Communication", ICML 2017). Orthonormal: the aggregator rotates the sum
back with the transpose. The signs come from the round's public seed; the rotation hides nothing."""

from __future__ import annotations

import hashlib

import numpy as np

from fedlite.protocol.secagg.prg import mask

MAX_BLOCK = 1024


def block_size(length: int) -> int:
    """The Hadamard block: the next power of two of `length`, at most MAX_BLOCK."""
    return min(MAX_BLOCK, 1 << max(0, (max(1, length) - 1).bit_length()))


def padded_length(length: int) -> int:
    block = block_size(length)
    return -(-length // block) * block


def _signs(seed: str, size: int) -> np.ndarray:
    """+-1 per coordinate: the low bit of each 32-bit word of the PRG keyed by SHA-256("fedlite-rotation/" seed)."""
    bits = mask(hashlib.sha256(b"fedlite-rotation/" + seed.encode()).digest(), size, 1)
    return bits.astype(np.float64) * 2 - 1


def _hadamard(blocks: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh-Hadamard transform of each row (its own inverse)."""
    out = blocks.copy()
    n = out.shape[1]
    h = 1
    while h < n:
        view = out.reshape(out.shape[0], -1, 2, h)
        a, b = view[:, :, 0, :].copy(), view[:, :, 1, :].copy()
        view[:, :, 0, :], view[:, :, 1, :] = a + b, a - b
        h *= 2
    return out / np.sqrt(n)


def rotate(flat: np.ndarray, seed: str) -> np.ndarray:
    """`flat` (length d) zero-padded to `padded_length(d)`, sign-flipped and Hadamard-transformed per block."""
    size, block = padded_length(len(flat)), block_size(len(flat))
    padded = np.zeros(size, dtype=np.float64)
    padded[:len(flat)] = flat
    return _hadamard((padded * _signs(seed, size)).reshape(-1, block)).ravel()


def unrotate(rotated: np.ndarray, seed: str, length: int) -> np.ndarray:
    """The inverse of `rotate`: the first `length` coordinates back in the model's order."""
    block = block_size(length)
    back = _hadamard(np.asarray(rotated, dtype=np.float64).reshape(-1, block)).ravel() * _signs(seed, len(rotated))
    return back[:length]
