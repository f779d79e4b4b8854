"""Aggregator memory and time: streaming mean vs "collect every update, then average".

Encodes N int8 updates of a P-parameter model with the real codec (a few distinct random deltas reused,
each with its own client id), writes them to a temporary file, then runs every variant in a fresh child
process so its peak memory is its own:

- streaming: decode + validate_update + MeanAggregator.add per update, then result() (O(model) memory);
- streaming-f32: the same with float32 instead of float64 accumulators (1x instead of 2x the model);
- collect:   decode + validate_update per update, keep every decoded delta, then a weighted np.average.

After one warm-up pass, peak growth is measured twice: peak RSS (ru_maxrss, its high-water mark reset via
/proc/self/clear_refs) minus the RSS once payloads are loaded, and the tracemalloc peak (numpy allocations
are traced) in a separate child, since tracing slows the loop. Growth is reported as a multiple of the
model's float32 size. Payloads stay resident in both: they are the broker's deliveries, not aggregation
state. Decoding uses Limits sized to the model (--default-limits for the codec's defaults). With the small
--quick model, RSS growth is dominated by a fixed few-MiB allocator floor; read the tracemalloc column there.

    python benchmarks/aggregation_memory.py                  # P = 1M, N = 100
    python benchmarks/aggregation_memory.py --quick          # P = 100k, N = 20
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchlib import current_rss, peak_rss, reset_peak_rss

if TYPE_CHECKING:
    from fedlite.protocol.codec import Limits

FEDERATION, ROUND, MODEL_HASH = "bench", 1, "ab" * 32
VARIANTS = ("streaming", "streaming-f32", "collect")


def layout(params: int, layers: int, width: int = 256) -> list[tuple[str, tuple[int, ...]]]:
    """A dense stack of `layers` (rows x width) kernels plus biases totalling about `params`."""
    rows = max(1, params // (layers * width))
    specs: list[tuple[str, tuple[int, ...]]] = []
    for i in range(layers):
        specs += [(f"dense_{i}/kernel", (rows, width)), (f"dense_{i}/bias", (width,))]
    return specs


def client_ids(n: int) -> list[str]:
    return [f"dev-{i:05d}" for i in range(n)]


def write_payloads(path: Path, params: int, layers: int, updates: int, distinct: int, seed: int) -> int:
    import numpy as np

    from fedlite.protocol.codec import Header, encode_update

    rng = np.random.default_rng(seed)
    specs = layout(params, layers)
    deltas = [{name: rng.normal(0, 0.01, shape).astype(np.float32) for name, shape in specs} for _ in range(distinct)]
    total = 0
    with open(path, "wb") as f:
        for i, cid in enumerate(client_ids(updates)):
            header = Header(kind="update", federation=FEDERATION, round=ROUND, model_hash=MODEL_HASH, client_id=cid,
                            num_examples=int(rng.integers(50, 500)), metrics={"loss": 1.0})
            payload = encode_update(deltas[i % distinct], header)
            f.write(struct.pack("<Q", len(payload)) + payload)
            total += len(payload)
    return total


def read_payloads(path: Path) -> list[bytes]:
    payloads = []
    with open(path, "rb") as f:
        while head := f.read(8):
            (size,) = struct.unpack("<Q", head)
            payloads.append(f.read(size))
    return payloads


def model_limits(params: int) -> Limits:
    """Limits sized to the model, as an aggregator that knows its manifest would set them."""
    from fedlite.protocol.codec import Limits

    return Limits(max_payload_bytes=4 * params + (1 << 20), max_decoded_bytes=2 * params + (1 << 20))


def run_variant(
    variant: str, payloads: list[bytes], specs: list[tuple[str, tuple[int, ...]]], limits: Limits
) -> dict[str, float]:
    import numpy as np

    from fedlite.aggregator.strategies import make_aggregator
    from fedlite.aggregator.validation import RoundContext, validate_update
    ids = client_ids(len(payloads))
    manifest = {"weights": [{"name": name, "shape": list(shape)} for name, shape in specs]}
    ctx = RoundContext(FEDERATION, ROUND, MODEL_HASH, manifest, frozenset(ids))
    start = time.perf_counter()
    if variant.startswith("streaming"):
        agg = make_aggregator("mean", specs, sum_dtype="float32" if variant.endswith("f32") else "float64")
        for cid, payload in zip(ids, payloads, strict=True):
            update = validate_update(payload, cid, ctx, limits)
            agg.add(update.delta, update.num_examples)
            del update
        result = agg.result()
    else:
        kept = []
        for cid, payload in zip(ids, payloads, strict=True):
            update = validate_update(payload, cid, ctx, limits)
            kept.append((update.delta, update.num_examples))
            del update
        weights = [n for _, n in kept]
        result = {name: np.average(np.stack([d[name] for d, _ in kept]), axis=0, weights=weights).astype(np.float32)
                  for name, _ in specs}
    elapsed = time.perf_counter() - start
    checksum = float(sum(float(np.sum(v, dtype=np.float64)) for v in result.values()))
    return {"seconds": elapsed, "accepted": len(ctx.accepted), "checksum": checksum}


def warm_up(payload: bytes, specs: list[tuple[str, tuple[int, ...]]], limits: Limits) -> None:
    """One throwaway pass so first-use costs (library code paged in, lazy imports) stay out of the numbers;
    a long-running aggregator has paid them before its first round."""
    run_variant("streaming", [payload], specs, limits)


def child(args: argparse.Namespace) -> None:
    import gc

    import numpy as np  # noqa: F401 - imported before the baseline so it is not counted
    import safetensors.numpy  # noqa: F401
    import zstandard  # noqa: F401

    import fedlite.aggregator.strategies  # noqa: F401
    import fedlite.aggregator.validation  # noqa: F401
    from fedlite.protocol.codec import Limits

    payloads = read_payloads(Path(args.payloads))
    specs = layout(args.params, args.layers)
    limits = Limits() if args.default_limits else model_limits(args.params)
    warm_up(payloads[0], specs, limits)
    gc.collect()
    out: dict[str, float] = {}
    if args.measure == "tracemalloc":
        import tracemalloc

        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        out |= run_variant(args.child, payloads, specs, limits)
        out["growth_bytes"] = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.stop()
    else:
        baseline = current_rss()
        # Without a reset, an earlier peak (imports, reading payloads) could hide part of the growth.
        masked = 0 if reset_peak_rss() else max(0, peak_rss() - baseline)
        out |= run_variant(args.child, payloads, specs, limits)
        out["growth_bytes"] = peak_rss() - baseline
        out["masked_bytes"] = masked
    print(json.dumps(out))


def spawn(variant: str, measure: str, args: argparse.Namespace, payload_file: Path) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", variant, "--measure", measure, "--payloads", str(payload_file),
           "--params", str(args.params), "--layers", str(args.layers)] + (["--default-limits"] * args.default_limits)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{variant}/{measure} child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000, help="model parameters P (default 1M)")
    parser.add_argument("--updates", type=int, default=100, help="client updates N per round (default 100)")
    parser.add_argument("--layers", type=int, default=4, help="dense layers the parameters are spread over")
    parser.add_argument("--distinct", type=int, default=4, help="distinct random deltas, reused across clients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="P = 100k, N = 20")
    parser.add_argument("--default-limits", action="store_true",
                        help="decode with the codec's default Limits instead of limits sized to the model")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("rss", "tracemalloc"), default="rss", help=argparse.SUPPRESS)
    parser.add_argument("--payloads", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    if args.quick:
        args.params, args.updates = 100_000, 20
    specs = layout(args.params, args.layers)
    params = sum(math.prod(shape) for _, shape in specs)
    model_bytes = params * 4
    with tempfile.TemporaryDirectory(prefix="fedlite-bench-") as tmp:
        payload_file = Path(tmp) / "payloads.bin"
        started = time.perf_counter()
        wire = write_payloads(payload_file, args.params, args.layers, args.updates, args.distinct, args.seed)
        encode_s = time.perf_counter() - started
        rows = []
        for variant in VARIANTS:
            rss = spawn(variant, "rss", args, payload_file)
            traced = spawn(variant, "tracemalloc", args, payload_file)
            if rss["accepted"] != args.updates:
                raise SystemExit(f"{variant}: only {rss['accepted']} of {args.updates} updates were accepted")
            rows.append((variant, rss, traced))
    mib = 1024 * 1024
    print(f"P = {params:,} parameters ({model_bytes / mib:.1f} MiB float32, {len(specs)} tensors), N = {args.updates} "
          f"updates, {wire / args.updates / 1024:.0f} KiB per update on the wire (encoding took {encode_s:.1f} s, "
          "outside the measurement)\n")
    print("| variant | wall time (s) | per update (ms) | peak RSS growth (MiB) | × model | "
          "tracemalloc peak (MiB) | × model |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant, rss, traced in rows:
        print(f"| {variant} | {rss['seconds']:.2f} | {1000 * rss['seconds'] / args.updates:.1f} | "
              f"{rss['growth_bytes'] / mib:.1f} | {rss['growth_bytes'] / model_bytes:.2f} | "
              f"{traced['growth_bytes'] / mib:.1f} | {traced['growth_bytes'] / model_bytes:.2f} |")
        if rss["masked_bytes"] > 0.05 * model_bytes:
            print(f"\nnote: {variant}: an earlier peak hides up to {rss['masked_bytes'] / mib:.1f} MiB of growth")
    print("\nFloor for streaming: accumulators (2× float64, 1× float32) + one decoded float32 delta (1×); the rest "
          "is the codec's decode transients (decompressed body, raw int8 tensors, one dequantization temporary).")


if __name__ == "__main__":
    main()
