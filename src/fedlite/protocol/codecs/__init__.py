"""Tensor encodings by name (the frame header's ``encoding``): one module per codec, each registering itself."""

from fedlite.protocol.codecs import blob, floats, int4, int8, int8_tensor, ternary_ef  # noqa: F401  (they register)
from fedlite.protocol.codecs.base import (
    Codec,
    CodecError,
    Tensors,
    TensorSource,
    check_encoding,
    get,
    names,
    register,
)

UPLINK = tuple(names("update"))  # the update encodings an agent built from this package can produce
DOWNLINK = tuple(names("weights"))

__all__ = ["DOWNLINK", "UPLINK", "Codec", "CodecError", "TensorSource", "Tensors", "check_encoding", "get", "names",
           "register"]
