"""Shamir t-of-n secret sharing of 32-byte secrets over GF(2^521 - 1) (one field element holds a whole secret).

Shamir, "How to Share a Secret", CACM 1979. A share is (x, y) with x in 1..n; any `threshold` distinct shares
give the secret back by Lagrange interpolation at 0, fewer reveal nothing about it. Coefficients come from
`secrets` (the OS's CSPRNG).
"""

from __future__ import annotations

import secrets as _csprng
from collections.abc import Iterable

PRIME = (1 << 521) - 1  # a Mersenne prime, larger than any 32-byte secret
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8): a field element, big-endian


class ShareError(ValueError):
    """Too few, repeated or out-of-range shares."""


def split(secret: bytes, threshold: int, points: Iterable[int]) -> dict[int, bytes]:
    """{x: share} for each x in `points` (distinct, 1 <= x < PRIME); any `threshold` of them recover `secret`."""
    xs = list(points)
    if len(secret) != SECRET_BYTES:
        raise ShareError(f"a secret is {SECRET_BYTES} bytes, not {len(secret)}")
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise ShareError(f"need 1 <= threshold ({threshold}) <= {len(xs)} distinct points in 1..p-1")
    coefficients = [int.from_bytes(secret, "big")] + [_csprng.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in xs}


def combine(shares: dict[int, bytes], threshold: int) -> bytes:
    """The secret from at least `threshold` shares (the first `threshold`, by x, are used)."""
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} shares, {threshold} needed")
    chosen = sorted(shares.items())[:threshold]
    xs = [x for x, _ in chosen]
    if not all(0 < x < PRIME for x in xs):
        raise ShareError("share point out of range")
    ys = [int.from_bytes(y, "big") for _, y in chosen]
    if any(len(y) != SHARE_BYTES for _, y in chosen) or any(y >= PRIME for y in ys):
        raise ShareError("malformed share")
    secret = 0
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShareError("the shares do not belong to one secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for c in reversed(coefficients):
        value = (value * x + c) % PRIME
    return value
