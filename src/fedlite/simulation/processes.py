"""A simulated federation as the demo runs one: a real Mosquitto, the aggregator and one agent process per device."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.aggregator.record import RoundRecord
from fedlite.demo.cluster import (
    SIMULATED_KEEP_PROCESS_SECONDS,
    LocalFederation,
    agent_seed,
    follow_history,
    write_shard,
)

Arrays = tuple[np.ndarray, np.ndarray]
Weights = dict[str, np.ndarray]
STATUS_SECONDS = 0.5  # how often the agents publish their status: a run starts as soon as they are all heard


def run_processes(tables: dict[str, dict[str, Any]], devices: dict[str, Arrays], test: Arrays | None,
                  model_dir: Path | None, holdout: float, seed: int, run_dir: Path,
                  show: Callable[[RoundRecord], None]) -> tuple[list[RoundRecord], Weights | None, float | None]:
    """(records, final weights, accuracy before round 1) of the aggregator's run of `tables` in `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    federation = tables["federation"]["name"]
    with LocalFederation(run_dir, federation, list(devices)) as fed:
        fed.start_broker()
        shards = {name: write_shard(run_dir / "data" / f"{name}.npz", x, y) for name, (x, y) in devices.items()}
        evaluation = {}
        if test is not None:
            np.savez(run_dir / "data" / "test.npz", x=test[0], y=test[1])  # held by the server only
            evaluation = {"test_data": str(run_dir / "data" / "test.npz")}
        if model_dir is not None:
            shutil.copytree(model_dir, run_dir / "aggregator" / "models" / "round-00000", dirs_exist_ok=True)
        for name, shard in shards.items():
            fed.start(name, "agent", fed.agent_config(
                name, shard, data={"holdout_fraction": holdout, "seed": seed},
                agent={"seed": agent_seed(seed, name), "status_interval_seconds": STATUS_SECONDS,
                       "keep_process_seconds": SIMULATED_KEEP_PROCESS_SECONDS}))
        config = fed.aggregator_config(**{k: v for k, v in tables.items() if k != "federation"},
                                       evaluation=evaluation)
        aggregator = fed.start("aggregator", "aggregator", config)
        rounds = tables["rounds"]
        history = follow_history(fed, aggregator, 120 + rounds["total"] * (rounds["deadline_seconds"] + 30), show)
    return history, _final_weights(run_dir / "aggregator"), _initial_accuracy(history)


def _final_weights(state_dir: Path) -> Weights | None:
    from fedlite.aggregator.state_dir import HISTORY_FILE, load_for_resume

    checkpoint = load_for_resume(state_dir / "checkpoints", state_dir / HISTORY_FILE)
    return None if checkpoint is None else checkpoint.weights


def _initial_accuracy(history: list[RoundRecord]) -> float | None:
    """The accuracy before round 1, as the aggregator's KPIs record it."""
    return next((r.kpis.get("initial_accuracy") for r in history if r.complete), None)
