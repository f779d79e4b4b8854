"""Masking in Z_{2^k} and its removal (Bonawitz et al., CCS 2017, with SecAgg+'s neighbour graph).

A device u with integer vector x_u sends y_u = x_u + PRG(b_u) + sum over neighbours v of sign(u, v) PRG(s_uv)
(mod 2^k), where b_u is its self-mask seed, s_uv the seed it agreed with v, and sign(u, v) = +1 if u < v else -1:
the pairwise masks cancel in any sum holding both u and v. The server unmasks the survivors' sum by subtracting
their self masks (seeds rebuilt from shares) and, for each neighbour v that dropped out after the masks were
fixed, the survivors' pairwise terms with v (v's mask key rebuilt from shares; v's own masked input never
arrived). Then the ring element is read as a signed integer.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedlite.protocol.secagg.prg import mask


def sign(me: str, other: str) -> int:
    return 1 if me < other else -1


def masked_input(values: np.ndarray, bits: int, self_seed: bytes, pair_seeds: dict[str, bytes],
                 me: str) -> np.ndarray:
    """y_u (uint64 in [0, 2^bits)) for the signed integers `values`."""
    modulus = np.uint64(1 << bits)
    total = values.astype(np.int64).astype(np.uint64) % modulus  # two's complement, reduced
    total = (total + mask(self_seed, len(values), bits)) % modulus
    for other, seed in pair_seeds.items():
        term = mask(seed, len(values), bits)
        total = (total + term if sign(me, other) > 0 else total + (modulus - term)) % modulus
    return total


def unmask(masked_sum: np.ndarray, bits: int, self_seeds: Iterable[bytes],
           dropped_pairs: Iterable[tuple[str, str, bytes]]) -> np.ndarray:
    """The survivors' signed integer sum: `masked_sum` (of their y) less their self masks and, for each
    (survivor u, dropped neighbour v, s_uv), u's term sign(u, v) PRG(s_uv)."""
    modulus = np.uint64(1 << bits)
    total = masked_sum.astype(np.uint64) % modulus
    length = len(total)
    for seed in self_seeds:
        total = (total + (modulus - mask(seed, length, bits))) % modulus
    for survivor, dropped, seed in dropped_pairs:
        term = mask(seed, length, bits)
        total = (total + (modulus - term) if sign(survivor, dropped) > 0 else total + term) % modulus
    return to_signed(total, bits)


def add(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """a + b in Z_{2^bits} (what the aggregator does with each masked input it receives)."""
    return (a.astype(np.uint64) + b.astype(np.uint64)) % np.uint64(1 << bits)


def to_signed(values: np.ndarray, bits: int) -> np.ndarray:
    half = np.uint64(1 << (bits - 1))
    signed = values.astype(np.int64)
    return np.where(values >= half, signed - (1 << bits), signed)


def pack(values: np.ndarray, bits: int) -> bytes:
    """`values` (each < 2^bits) as a big-endian bit string, `bits` per value, zero-padded to a byte."""
    words = values.astype(">u4").view(np.uint8).reshape(-1, 4)
    return np.packbits(np.unpackbits(words, axis=1)[:, 32 - bits:]).tobytes()


def unpack(data: bytes, bits: int, length: int) -> np.ndarray:
    """The inverse of `pack`; ValueError if `data` is not `length` values of `bits` bits."""
    if len(data) != (length * bits + 7) // 8:
        raise ValueError(f"{len(data)} bytes are not {length} values of {bits} bits")
    raw = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:length * bits].reshape(length, bits)
    padded = np.concatenate([np.zeros((length, 32 - bits), dtype=np.uint8), raw], axis=1)
    return np.packbits(padded, axis=1).view(">u4").ravel().astype(np.uint64)
