"""A user's own architecture, found the same way by `fedlite export` and the aggregator.

`MODULE:FUNCTION` names an importable module (on the Python path, else a `MODULE.py` in the base directory:
the current directory for `fedlite export`, the configuration file's directory for the aggregator), and
`FILE.py:FUNCTION` a file (relative to the base directory). The function is `builder(input_shape, classes,
**options) -> ModelDef`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any


class BuilderError(ValueError):
    """The builder cannot be found or imported; the message names what is missing."""


def load_builder(spec: str, base_dir: str | Path = ".") -> Callable[..., Any]:
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise BuilderError(f"builder must be MODULE:FUNCTION or FILE.py:FUNCTION, not {spec!r}")
    module = _module(module_name, Path(base_dir))
    builder = getattr(module, name, None)
    if not callable(builder):
        raise BuilderError(f"builder {spec!r}: {module_name} has no function {name!r}")
    return builder


def canonical(spec: str, base_dir: str | Path) -> str:
    """The same builder as a spec that resolves from any directory: FILE.py:FUNCTION with an absolute path when
    the module is a file of the base directory (or given as one), the spec itself when it is importable."""
    load_builder(spec, base_dir)
    module_name, _, name = spec.partition(":")
    if module_name.endswith(".py"):
        return f"{(Path(base_dir) / module_name).resolve()}:{name}"
    if importlib.util.find_spec(module_name.split(".")[0]) is not None:
        return spec
    return f"{(Path(base_dir) / (module_name.replace('.', '/') + '.py')).resolve()}:{name}"


def _module(module_name: str, base_dir: Path) -> ModuleType:
    if module_name.endswith(".py"):
        return _from_file(base_dir / module_name)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name.split(".")[0]:
            raise BuilderError(f"importing {module_name}: {exc}") from None
    except Exception as exc:  # the user's module failed while importing
        raise BuilderError(f"importing {module_name}: {type(exc).__name__}: {exc}") from None
    path = (base_dir / (module_name.replace(".", "/") + ".py")).resolve()
    if not path.is_file():
        raise BuilderError(f"no module {module_name!r} on the Python path, nor {path}")
    return _from_file(path)


def _from_file(path: Path) -> ModuleType:
    path = path.resolve()
    if not path.is_file():
        raise BuilderError(f"builder file {path} does not exist")
    name = f"fedlite_builder_{path.stem}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    loaded = importlib.util.spec_from_file_location(name, path)
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    sys.modules[name] = module
    try:
        loaded.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise BuilderError(f"importing {path}: {type(exc).__name__}: {exc}") from None
    return module
