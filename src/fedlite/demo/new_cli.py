"""`fedlite new PROJECT`: write a ready federation project to start from."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedlite.demo.datasets import TASKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("project", type=Path, help="the directory to write (new, or empty)")
    parser.add_argument("--task", choices=sorted(TASKS), default="digits",
                        help="the sample task: its data (scikit-learn's, no download) and model")
    parser.add_argument("--devices", type=int, default=3, help="local devices the sample data is split for")
    parser.add_argument("--rounds", type=int, default=20, help="[rounds] total")
    parser.add_argument("--port", type=int, default=1883, help="the broker's aggregator listener (loopback)")
    parser.add_argument("--device-port", type=int, default=1884, help="the broker's device listener (loopback)")
    parser.add_argument("--federation", default="", help="the federation's name (default: the directory's name)")
    parser.add_argument("--seed", type=int, default=0, help="the sample split's and the model's seed")


def run(args: argparse.Namespace) -> int:
    from fedlite.demo.project import ProjectError, ProjectSpec, write_project

    spec = ProjectSpec(args.project, task=args.task, devices=args.devices, rounds=args.rounds, port=args.port,
                       device_port=args.device_port, seed=args.seed, federation=args.federation)
    try:
        written = write_project(spec)
    except ProjectError as exc:
        print(f"fedlite new: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {args.project}: federation {spec.name}, {spec.devices} devices")
    print(f"next: cd {args.project} and follow README.md (python model.py, python data.py ..., fedlite broker ...)")
    return 0
