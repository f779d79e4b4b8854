"""Ed25519 signature verification (RFC 8032, section 5.1.7) in pure Python, for a lean device process.

An agent only verifies; importing `cryptography` for that keeps about 10 MiB resident (its Rust module and
the OpenSSL linked into it). This verifier needs `hashlib` alone. It is strict: a signature whose S is not
below the group order, or whose R or public key is not a canonical point encoding, is refused; the check is
the cofactorless equation [S]B = R + [k]A, compared on encodings, as OpenSSL does. It verifies only public
data, so it need not run in constant time.
"""

from __future__ import annotations

import base64
import hashlib

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493  # the order of the base point
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
# The SubjectPublicKeyInfo DER prefix of an Ed25519 key (OID 1.3.101.112), followed by the 32 raw bytes
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")

Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, x*y = T/Z


class BadPublicKey(ValueError):
    """Bytes that are not an Ed25519 public key."""


def _add(p: Point, q: Point) -> Point:
    a = (p[1] - p[0]) * (q[1] - q[0]) % P
    b = (p[1] + p[0]) * (q[1] + q[0]) % P
    c = 2 * p[3] * q[3] * D % P
    d = 2 * p[2] * q[2] % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % P, g * h % P, f * g % P, e * h % P


def _double(p: Point) -> Point:
    a, b = p[0] * p[0] % P, p[1] * p[1] % P
    c = 2 * p[2] * p[2] % P
    h = a + b
    e = h - (p[0] + p[1]) ** 2 % P
    g = a - b
    f = c + g
    return e * f % P, g * h % P, f * g % P, e * h % P


def _multiply(scalar: int, p: Point) -> Point:
    result: Point = (0, 1, 1, 0)
    while scalar:
        if scalar & 1:
            result = _add(result, p)
        p = _double(p)
        scalar >>= 1
    return result


def _encode(p: Point) -> bytes:
    zinv = pow(p[2], P - 2, P)
    x, y = p[0] * zinv % P, p[1] * zinv % P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _decode(data: bytes) -> Point | None:
    """The point a 32-byte encoding names; None if the encoding is not canonical or not on the curve."""
    value = int.from_bytes(data, "little")
    sign, y = value >> 255, value & ((1 << 255) - 1)
    if y >= P:
        return None
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    if x2 == 0:
        if sign:
            return None
        x = 0
    else:
        x = pow(x2, (P + 3) // 8, P)
        if (x * x - x2) % P:
            x = x * SQRT_M1 % P
        if (x * x - x2) % P:
            return None
        if x & 1 != sign:
            x = P - x
    return x, y, 1, x * y % P


_GY = 4 * pow(5, P - 2, P) % P
BASE = _decode(_GY.to_bytes(32, "little"))
assert BASE is not None


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether `signature` (64 bytes) is the owner of `public_key` (32 raw bytes) signing `message`."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    a, r = _decode(public_key), _decode(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= L:
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little") % L
    assert BASE is not None
    return _encode(_multiply(s, BASE)) == _encode(_add(r, _multiply(k, a)))


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
    if _decode(raw) is None:
        raise BadPublicKey("not a point on the Ed25519 curve")
    return raw
