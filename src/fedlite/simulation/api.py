"""`fedlite.simulation.run`: a federated run from Python, in process or as the demo's processes, as a `History`."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedlite.aggregator.config import DEFAULT_ENCODING, AggregatorConfig
from fedlite.aggregator.record import RoundRecord
from fedlite.settings import from_dict
from fedlite.simulation.history import History
from fedlite.simulation.options import (
    Arrays,
    ModelArg,
    Partition,
    StrategyArg,
    check_codec,
    devices_of,
    model_table,
    server_table,
)

FEDERATION = "sim"
DEADLINE_SECONDS = 30.0  # processes: a round's deadline (in process every device answers at once)


def run(model: ModelArg = "mlp", partitions: Partition | Sequence[Arrays] = Partition(), rounds: int = 10,
        strategy: StrategyArg = "fedavg", codec: str = DEFAULT_ENCODING, *, clients_per_round: int = 0,
        local_epochs: int = 1, batch_size: int = 0, learning_rate: float = 0.0, learning_rate_decay: float = 1.0,
        holdout: float = 0.2, test: Arrays | None = None, seed: int = 0, processes: bool = False,
        run_dir: str | Path | None = None, progress: Callable[[RoundRecord], None] | None = None) -> History:
    """Run `rounds` federated rounds and return their `History`.

    `model`: an architecture name (``"mlp"``, ``"cnn"``, ``"conv1d"``), an exported model directory, or a dict
    of [model] options (``arch``, ``options``, ``builder``, ``seed``, ...). `partitions`: a `Partition` spec of
    a bundled task, or one (x, y) pair of arrays per device (then `test`, an (x, y) pair, is the server's test
    set). `strategy`: a server optimizer or aggregation name, or (name, {option: value}). `codec`: the update
    encoding. `clients_per_round`: K (0: every device). `batch_size` and `learning_rate` (0: the task's, else 32
    and 0.1) are the devices' SGD settings; `holdout`, each device's held-out fraction.

    In process (the default) the aggregator's round code and the devices' training, encoding and downlink run
    in this process, without a broker; ``processes=True`` starts a real Mosquitto, the aggregator and one agent
    per device, as `fedlite demo` does. `run_dir` keeps the run's files (default: a temporary directory, removed
    afterwards); `progress(record)` is called after every round attempt. Bad arguments raise ValueError.
    """
    started = time.time()
    devices, test, task = devices_of(partitions, test, seed)
    strategy_name, server = server_table(strategy)
    model_tables, model_dir = model_table(model, devices, test, task)
    tables = _tables(rounds, len(devices), clients_per_round, seed, model_tables, server, {
        "epochs": local_epochs, "batch_size": batch_size or (task.batch_size if task else 32),
        "learning_rate": learning_rate or (task.lr if task else 0.1), "learning_rate_decay": learning_rate_decay,
        "encoding": check_codec(codec)})
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), not {holdout}")
    with _directory(run_dir) as folder:
        tables["federation"] = {"name": FEDERATION, "state_dir": str(folder / "aggregator")}
        config = from_dict(AggregatorConfig, tables, "simulation")  # a ConfigError is a ValueError
        show = progress or (lambda record: None)
        if processes:
            from fedlite.simulation.processes import run_processes

            records, weights, initial = run_processes(tables, devices, test, model_dir, holdout, seed, folder, show)
        else:
            from fedlite.simulation.in_process import run_in_process

            records, weights, initial = run_in_process(config, devices, test, model_dir, holdout,
                                                       folder / "aggregator", show)
    return History(rounds=tuple(records), mode="processes" if processes else "in-process", codec=codec,
                   strategy=strategy_name, clients=len(devices), seconds=round(time.time() - started, 3),
                   initial_accuracy=initial, weights=weights)


def _tables(rounds: int, clients: int, clients_per_round: int, seed: int, model: dict[str, Any],
            server: dict[str, Any], training: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The aggregator's configuration tables for the run (checked by the configuration's own rules)."""
    if not 0 <= clients_per_round <= clients:
        raise ValueError(f"clients_per_round must be 0 (every device) to {clients}, not {clients_per_round}")
    per_round = clients_per_round or clients
    return {
        "model": model | {"seed": model.get("seed", seed), "export_every": 0},
        "rounds": {"total": rounds, "clients_per_round": per_round, "over_selection": 0.0,
                   "deadline_seconds": DEADLINE_SECONDS, "wait_for_devices_seconds": 20.0, "status_ttl_seconds": 5.0,
                   "seed": seed},
        "training": training,
        "server": server,
    }


class _directory:
    """`run_dir` as given (created), or a temporary directory removed on exit."""

    def __init__(self, run_dir: str | Path | None) -> None:
        self.given = Path(run_dir).resolve() if run_dir is not None else None
        self._temporary: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Path:
        if self.given is not None:
            self.given.mkdir(parents=True, exist_ok=True)
            return self.given
        self._temporary = tempfile.TemporaryDirectory(prefix="fedlite-simulation-")
        return Path(self._temporary.name)

    def __exit__(self, *exc: object) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()
