"""``int8-tensor``: symmetric int8 codes with one float32 scale per tensor (compresses better than per channel)."""

from __future__ import annotations

from fedlite.protocol.codecs.base import register
from fedlite.protocol.codecs.int8 import Int8


class Int8Tensor(Int8):
    """Each weight ``W``: int8 ``W`` (codes -127..127) and float32 ``W:scale`` of shape [1]."""

    name = "int8-tensor"
    order = 1
    kinds = ("update",)
    per_channel = False
    compact = True


register(Int8Tensor())
