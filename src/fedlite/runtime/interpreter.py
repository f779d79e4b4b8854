"""The TFLite interpreter on a device: ai-edge-litert if installed, else tflite-runtime; never TensorFlow."""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import cache
from pathlib import Path
from typing import Any

# The Python versions tflite-runtime has wheels for: the `agent-legacy` extra installs it on these only.
LEGACY_RUNTIME_PYTHONS = ((3, 11),)


class RuntimeMissing(ImportError):
    """No TFLite runtime is importable; the message says what to install for this Python."""


def missing_runtime_message(version: tuple[int, int] | None = None) -> str:
    """One line: what gives this Python (3.x) a TFLite runtime."""
    major, minor = version or sys.version_info[:2]
    if (major, minor) > LEGACY_RUNTIME_PYTHONS[-1]:
        return (f"no TFLite runtime installed: pip install 'fedlite[agent]' (ai-edge-litert); 'fedlite[agent-legacy]' "
                f"installs none on Python {major}.{minor} (tflite-runtime has no wheels after Python 3.11)")
    return (f"no TFLite runtime installed: pip install 'fedlite[agent]' (ai-edge-litert), or on older Pi OS "
            f"'fedlite[agent-legacy]' (tflite-runtime 2.14 with numpy<2, Python {major}.{minor})")


# (the package imported, the name reported), in the order `load_interpreter` tries them
RUNTIMES = (("ai_edge_litert", "ai-edge-litert"), ("tflite_runtime", "tflite-runtime"))


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
        raise RuntimeMissing(missing_runtime_message()) from e


@cache
def runtime_name() -> str:
    """`ai-edge-litert` or `tflite-runtime`: the runtime `load_interpreter` uses; RuntimeMissing if there is none.

    Found without importing it (an imported LiteRT keeps about 10 MiB resident in an idle agent).
    """
    for package, name in RUNTIMES:
        try:
            if importlib.util.find_spec(package) is not None:
                return name
        except (ImportError, ValueError):
            continue
    raise RuntimeMissing(missing_runtime_message())


def load_interpreter(model: bytes | str | os.PathLike[str], num_threads: int = 1) -> Any:
    """An interpreter for a .tflite file path or model bytes, tensors allocated."""
    interpreter_class, _ = _interpreter_class()
    if isinstance(model, bytes | bytearray):
        interpreter = interpreter_class(model_content=bytes(model), num_threads=num_threads)
    else:
        interpreter = interpreter_class(model_path=str(Path(model)), num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter
