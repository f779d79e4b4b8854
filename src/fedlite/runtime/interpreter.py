"""The TFLite interpreter on a device: ai-edge-litert if installed, else tflite-runtime; never TensorFlow."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
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


_PROBE = """
import importlib, json, sys
errors = []
for package, name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(package + ".interpreter")
        print(json.dumps([name, errors]))
        break
    except Exception as exc:
        errors.append(f"{name} is installed but does not import: {type(exc).__name__}: {exc}")
else:
    print(json.dumps([None, errors]))
"""
_probed: list[str] = []  # the runtime a child process imported (`probe_runtime`), once known


@cache
def _installed() -> tuple[tuple[str, str], ...]:
    found = []
    for package, name in RUNTIMES:
        try:
            if importlib.util.find_spec(package) is not None:
                found.append((package, name))
        except (ImportError, ValueError):
            continue
    return tuple(found)


def runtime_name() -> str:
    """`ai-edge-litert` or `tflite-runtime`: the runtime `load_interpreter` uses; RuntimeMissing if there is none.

    Found without importing it (an imported LiteRT keeps about 10 MiB resident in an idle agent).
    """
    if _probed:
        return _probed[0]
    installed = _installed()
    if not installed:
        raise RuntimeMissing(missing_runtime_message())
    return installed[0][1]


def probe_runtime(timeout: float = 120.0) -> str:
    """The runtime's name after importing it in a short-lived child process; RuntimeMissing saying why if none does.

    An installed runtime that does not import (tflite-runtime 2.14 beside numpy 2, say) is caught at start-up
    this way, while the agent itself never imports it until it trains.
    """
    installed = _installed()
    if not installed:
        raise RuntimeMissing(missing_runtime_message())
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(installed)], capture_output=True, text=True,
                             timeout=timeout, check=False).stdout
        name, errors = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        raise RuntimeMissing(f"could not check the TFLite runtime: {exc}") from None
    if name is None:
        raise RuntimeMissing("; ".join(errors))
    _probed[:] = [name]
    return str(name)


def load_interpreter(model: bytes | str | os.PathLike[str], num_threads: int = 1) -> Any:
    """An interpreter for a .tflite file path or model bytes, tensors allocated."""
    interpreter_class, _ = _interpreter_class()
    if isinstance(model, bytes | bytearray):
        interpreter = interpreter_class(model_content=bytes(model), num_threads=num_threads)
    else:
        interpreter = interpreter_class(model_path=str(Path(model)), num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter
