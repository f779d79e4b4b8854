"""One process of virtual devices for `fedlite simulate` (see `demo.fleet`)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from fedlite.demo.fleet import LeanFleet


def run_worker(spec: dict) -> None:
    """Drive every virtual device of `spec` (a `LeanFleet`) until SIGTERM or SIGINT arrives."""
    with np.load(spec["data"], allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    fleet = LeanFleet(spec, x, y)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    fleet.run(stop)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_worker(json.loads(Path(sys.argv[1]).read_text()))


if __name__ == "__main__":
    main()
