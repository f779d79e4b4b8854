"""What `run`'s arguments mean: devices' data, the model, the strategy and the codec, checked and resolved into the
aggregator's configuration tables (a name nobody registered is a ValueError naming the ones that are)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from fedlite.protocol import codecs

Arrays = tuple[np.ndarray, np.ndarray]
StrategyArg = Union[str, tuple[str, Mapping[str, Any]]]
ModelArg = Union[str, Path, Mapping[str, Any]]
MODEL_KEYS = ("arch", "builder", "options", "seed", "downlink_dtype", "downlink_delta")


@dataclass(frozen=True)
class Partition:
    """A partition spec: one of the demo's bundled tasks (`fedlite.demo.datasets.TASKS`), its training split
    divided over `clients` devices by `scheme` (iid | dirichlet | shards | mcmahan; `alpha` for dirichlet); the
    task's test split is the server's test set, and its SGD settings are the run's defaults."""

    task: str = "digits"
    clients: int = 10
    scheme: str = "dirichlet"
    alpha: float = 0.5


def devices_of(partitions: Partition | Sequence[Arrays], test: Arrays | None,
               seed: int) -> tuple[dict[str, Arrays], Arrays | None, Any]:
    """({device: (x, y)}, the test set, the task or None) from a spec or from per-device arrays; a given `test`
    replaces a spec's test split."""
    if isinstance(partitions, Partition):
        devices, task_test, task = _from_spec(partitions, seed)
        return devices, task_test if test is None else _pair(test, "test"), task
    if isinstance(partitions, (str, bytes)) or not isinstance(partitions, Sequence) or not partitions:
        raise ValueError("partitions must be a Partition spec or a non-empty list of (x, y) arrays, one per device")
    devices = {}
    for i, pair in enumerate(partitions):
        devices[f"device-{i:02d}"] = _pair(pair, f"partitions[{i}]")
    shapes = {x.shape[1:] for x, _ in devices.values()}
    if len(shapes) != 1:
        raise ValueError(f"every device's x must have the same example shape, got {sorted(shapes)}")
    return devices, None if test is None else _pair(test, "test"), None


def _pair(pair: Any, what: str) -> Arrays:
    try:
        x, y = pair
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an (x, y) pair of arrays") from None
    x, y = np.asarray(x, np.float32), np.asarray(y)
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{what}: need x of shape (n, features...) and y of shape (n,), n > 0; got {x.shape} and "
                         f"{y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError(f"{what}: labels must be integers >= 0")
    return x, y.astype(np.int64)


def _from_spec(spec: Partition, seed: int) -> tuple[dict[str, Arrays], Arrays, Any]:
    from fedlite.demo.datasets import TASKS, load_task
    from fedlite.demo.partition import partition

    if spec.task not in TASKS:
        raise ValueError(f"unknown task {spec.task!r}; choose from {', '.join(sorted(TASKS))}")
    if spec.clients < 1:
        raise ValueError(f"a partition needs clients >= 1, not {spec.clients}")
    task = load_task(spec.task, seed=seed)
    parts = partition(spec.scheme, task.y_train, spec.clients, np.random.default_rng(seed), alpha=spec.alpha)
    devices = {f"device-{i:02d}": (task.x_train[p], task.y_train[p]) for i, p in enumerate(parts)}
    return devices, (task.x_test, task.y_test), task


def model_table(model: ModelArg, devices: dict[str, Arrays], test: Arrays | None,
                task: Any) -> tuple[dict[str, Any], Path | None]:
    """The [model] table and the exported model directory to start from, if `model` names one."""
    x0 = next(iter(devices.values()))[0]
    input_shape = [int(d) for d in x0.shape[1:]]
    labels = [y for _, y in devices.values()] + ([test[1]] if test is not None else [])
    classes = max(2, task.classes if task is not None else int(max(int(y.max()) for y in labels)) + 1)
    base = {"input_shape": input_shape, "classes": classes}
    if isinstance(model, Path) or (isinstance(model, str) and (Path(model) / "manifest.json").is_file()):
        return _exported(Path(model), input_shape, classes)
    if isinstance(model, str):
        table = {"arch": model}
    elif isinstance(model, Mapping):
        unknown = sorted(set(model) - set(MODEL_KEYS))
        if unknown:
            raise ValueError(f"model options {', '.join(unknown)} are not among {', '.join(MODEL_KEYS)}")
        table = dict(model)
    else:
        raise ValueError("model must be an architecture name, an exported model directory or a dict of "
                         f"{', '.join(MODEL_KEYS)}")
    if table.get("builder"):
        table["builder"] = _builder(str(table["builder"]))
    else:
        _check_arch(str(table.get("arch", "mlp")))
        if task is not None and table.get("arch", "mlp") == task.arch and "options" not in table:
            table["options"] = dict(task.options)
    return base | table, None


def _check_arch(name: str) -> None:
    from fedlite.model_export.architectures import available

    if name not in available():
        raise ValueError(f"unknown model {name!r}; choose an architecture ({', '.join(available())}), an exported "
                         "model directory (with manifest.json) or {'builder': 'module:function'}")


def _builder(spec: str) -> str:
    """A builder spec found from the current directory, as `fedlite export` finds it, in a form that resolves from
    anywhere (the aggregator process reads it from its configuration file's directory)."""
    from fedlite.model_export.builders import BuilderError, canonical

    try:
        return canonical(spec, Path.cwd())
    except BuilderError as exc:
        raise ValueError(f"model builder: {exc}") from None


def _exported(folder: Path, input_shape: list[int], classes: int) -> tuple[dict[str, Any], Path]:
    from fedlite.protocol.manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(folder)
    except ManifestError as exc:
        raise ValueError(f"model: {exc}") from None
    shape = [int(d) for d in manifest["input"]["shape"]]
    if shape != input_shape or int(manifest["classes"]) < classes:
        raise ValueError(f"the model in {folder} takes inputs {shape} and {manifest['classes']} classes; the data has "
                         f"{input_shape} and {classes}")
    table = {"arch": manifest.get("arch", "mlp"), "input_shape": shape, "classes": int(manifest["classes"]),
             "options": dict(manifest.get("options") or {})}
    return table, folder.resolve()


def server_table(strategy: StrategyArg) -> tuple[str, dict[str, Any]]:
    """(name, the [server] table): a registered server optimizer (with the mean) or aggregation rule (with FedAvg),
    and its options as its [server.<name>] table (``server_lr`` or ``learning_rate``: [server] learning_rate)."""
    from fedlite.aggregator.strategies import registry

    if isinstance(strategy, str):
        name, options = strategy, {}
    elif isinstance(strategy, tuple) and len(strategy) == 2 and isinstance(strategy[1], Mapping):
        name, options = str(strategy[0]), dict(strategy[1])
    else:
        raise ValueError("strategy must be a name or a (name, {option: value}) pair")
    optimizers, reducers = registry.optimizer_names(), registry.reducer_names()
    if name in optimizers:
        table: dict[str, Any] = {"optimizer": name}
    elif name in reducers:
        table = {"aggregation": name}
    else:
        raise ValueError(f"unknown strategy {name!r}; choose a server optimizer ({', '.join(optimizers)}) or an "
                         f"aggregation ({', '.join(reducers)})")
    for key in ("server_lr", "learning_rate"):
        if key in options:
            table["learning_rate"] = options.pop(key)
    if options:
        table[name] = options
    return name, table


def check_codec(codec: str) -> str:
    if codec not in codecs.UPLINK:
        raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(codecs.UPLINK)}")
    return codec
