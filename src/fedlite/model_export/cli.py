"""`fedlite export`: write a trainable TFLite model, its int8 inference model and manifest.json."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def _shape(text: str) -> tuple[int, ...]:
    """`64`, `8,8,1` or `8x8x1`: positive sizes, every part one."""
    parts = text.replace("x", ",").split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected positive sizes separated by ',' or 'x', got {text!r}")
    return tuple(int(p) for p in parts)


def _classes(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"a classifier needs at least 2 classes, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--arch", help="registered architecture: mlp, cnn, conv1d")
    what.add_argument("--builder", metavar="MODULE:FUNCTION",
                      help="your own builder(input_shape, classes, **options) -> ModelDef")
    what.add_argument("--keras", type=Path, metavar="MODEL.keras",
                      help="a saved tf.keras Sequential or functional model (its input shape, classes and weights)")
    parser.add_argument("--input-shape", type=_shape, help="e.g. 64 or 8,8,1 or 32,3 (not with --keras)")
    parser.add_argument("--classes", type=_classes, help="number of output classes, at least 2 (not with --keras)")
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


def _error(message: str) -> int:
    print(f"fedlite export: {message}", file=sys.stderr)
    return 2


def _calibration(path: Path) -> Any:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data:
                raise ValueError(f"{path} has no array named x (the calibration inputs)")
            return data["x"]
    except (OSError, ValueError) as exc:
        raise ValueError(f"calibration file {path}: {exc}") from None


def _usage(args: argparse.Namespace) -> str | None:
    """What is wrong with the combination of options, if anything."""
    if args.keras:
        given = [flag for flag, value in (("--input-shape", args.input_shape), ("--classes", args.classes),
                                          ("--hidden", args.hidden), ("--filters", args.filters)) if value]
        if given:
            return f"{', '.join(given)} cannot be used with --keras (the Keras model defines its layers)"
        if not args.keras.is_file():
            return f"no Keras model file at {args.keras}"
        return None
    missing = [flag for flag, value in (("--input-shape", args.input_shape), ("--classes", args.classes))
               if value is None]
    verb = "is" if len(missing) == 1 else "are"
    return f"{' and '.join(missing)} {verb} required with --arch or --builder" if missing else None


def _export(args: argparse.Namespace) -> dict[str, Any]:
    from .builders import load_builder
    from .convert import calibration_samples, export_model
    from .keras_import import from_keras, load, translate

    representative = _calibration(args.calibration) if args.calibration else None
    if args.keras:
        model = load(args.keras)
        if representative is not None:
            calibration_samples(translate(model)[0].input_shape, representative, args.seed)
        return dict(from_keras(model, args.out, representative=representative, seed=args.seed))
    builder = load_builder(args.builder) if args.builder else None
    if representative is not None:
        calibration_samples(args.input_shape, representative, args.seed)  # the shape, before TensorFlow loads
    return export_model(args.builder or args.arch, args.input_shape, args.classes, args.out,
                        representative=representative, seed=args.seed, options=_options(args), builder=builder)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from .architectures import available
    from .builders import BuilderError
    from .convert import ConversionError
    from .keras_import import KerasImportError

    if args.arch and args.arch not in available():
        return _error(f"unknown architecture {args.arch!r}; choose from {', '.join(available())} (or --builder)")
    if (problem := _usage(args)) is not None:
        return _error(problem)
    try:
        manifest = _export(args)
    except (BuilderError, ConversionError, KerasImportError, OSError, TypeError, ValueError) as exc:
        return _error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    print(f"exported {manifest['arch']} {manifest['input']['shape']} -> {manifest['classes']} classes, "
          f"{manifest['num_params']} params, model_hash {manifest['model_hash'][:16]}")
    for entry in manifest["files"].values():
        print(f"  {args.out / entry['path']}  {entry['bytes']} bytes  sha256 {entry['sha256'][:16]}")
    print(f"  {args.out / 'manifest.json'}")
    return 0
