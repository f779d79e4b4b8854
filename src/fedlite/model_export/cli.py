"""`fedlite export`: write a trainable TFLite model, its int8 inference model and manifest.json."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return shape


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--arch", help="registered architecture: mlp, cnn, conv1d")
    what.add_argument("--builder", metavar="MODULE:FUNCTION",
                      help="your own builder(input_shape, classes, **options) -> ModelDef")
    parser.add_argument("--input-shape", type=_shape, required=True, help="e.g. 64 or 8,8,1 or 32,3")
    parser.add_argument("--classes", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--hidden", type=_shape, help="dense hidden sizes, e.g. 64,32")
    parser.add_argument("--filters", type=_shape, help="conv filters per block (cnn, conv1d), e.g. 8,16")
    parser.add_argument("--calibration", type=Path, help=".npz with inputs under key x, to calibrate the int8 model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.hidden:
        options["hidden"] = list(args.hidden)
    if args.filters:
        options["filters"] = list(args.filters)
    return options


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from .builders import BuilderError, load_builder
    from .convert import export_model

    try:
        builder = load_builder(args.builder) if args.builder else None
    except BuilderError as exc:
        print(f"fedlite export: {exc}", file=sys.stderr)
        return 2
    representative = None
    if args.calibration:
        with np.load(args.calibration) as data:
            if "x" not in data:
                print(f"fedlite export: {args.calibration} has no array named x", file=sys.stderr)
                return 2
            representative = data["x"]
    manifest = export_model(args.builder or args.arch, args.input_shape, args.classes, args.out,
                            representative=representative, seed=args.seed, options=_options(args), builder=builder)
    print(f"exported {manifest['arch']} {manifest['input']['shape']} -> {manifest['classes']} classes, "
          f"{manifest['num_params']} params, model_hash {manifest['model_hash'][:16]}")
    for entry in manifest["files"].values():
        print(f"  {args.out / entry['path']}  {entry['bytes']} bytes  sha256 {entry['sha256'][:16]}")
    print(f"  {args.out / 'manifest.json'}")
    return 0
