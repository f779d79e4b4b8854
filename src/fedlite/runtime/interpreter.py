"""The TFLite interpreter on a device: ai-edge-litert if installed, else tflite-runtime; never TensorFlow."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any


@cache
def _interpreter_class() -> tuple[type, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite-runtime"
    except ImportError as e:
        raise ImportError("no TFLite runtime: install ai-edge-litert (or tflite-runtime with numpy<2)") from e


def runtime_name() -> str:
    """`ai-edge-litert` or `tflite-runtime`: the runtime `load_interpreter` uses."""
    return _interpreter_class()[1]


def load_interpreter(model: bytes | str | os.PathLike[str], num_threads: int = 1) -> Any:
    """An interpreter for a .tflite file path or model bytes, tensors allocated."""
    interpreter_class, _ = _interpreter_class()
    if isinstance(model, bytes | bytearray):
        interpreter = interpreter_class(model_content=bytes(model), num_threads=num_threads)
    else:
        interpreter = interpreter_class(model_path=str(Path(model)), num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter
