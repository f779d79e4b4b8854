"""One process of virtual agents for `fedlite simulate`: real Agent objects, each with its own MQTT link."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from fedlite.agent.config import AgentConfig, AgentSection, BrokerSection, DeviceSection, TrustSection
from fedlite.agent.data import DataSpec, split
from fedlite.agent.models import ModelCache
from fedlite.agent.service import Agent
from fedlite.agent.state import FileState


def run_worker(spec: dict) -> None:
    """Start every virtual agent of `spec` in its own thread; return when SIGTERM arrives."""
    root = Path(spec["run_dir"])
    with np.load(spec["data"], allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    models = ModelCache(root / f"models-{spec['worker']}")
    rng = np.random.default_rng(spec["worker"])
    agents = []
    for client_id, password in spec["devices"].items():
        pick = rng.choice(len(x), size=spec["examples_per_client"], replace=False)
        config = AgentConfig(
            device=DeviceSection(client_id, spec["federation"], state_dir=str(root / "devices" / client_id)),
            data=DataSpec("npz", spec["data"], holdout_fraction=0.0),
            broker=BrokerSection(host=spec["host"], port=spec["port"], tls=False, username=client_id,
                                 password=password, reconnect_min_seconds=2.0),
            agent=AgentSection(status_interval_seconds=spec["status_interval_seconds"]),
            trust=TrustSection(aggregator_keys=[spec["aggregator_key"]]),
        )
        local = split(x[pick].astype(np.float32), y[pick].astype(np.int64), 0.0, 0)
        agents.append(Agent(config, FileState(root / "no-such-state.json"), data=local, models=models))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threads = [threading.Thread(target=agent.run, name=agent.client_id, daemon=True) for agent in agents]
    for thread in threads:
        thread.start()
    stop.wait()
    for agent in agents:
        agent.stop()
    for thread in threads:
        thread.join(5)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_worker(json.loads(Path(sys.argv[1]).read_text()))


if __name__ == "__main__":
    main()
