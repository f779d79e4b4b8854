"""`fedlite demo`: a complete federated training run on this machine (broker, aggregator, agents, model)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="digits", help="digits (images), health (tabular) or wine")
    parser.add_argument("--clients", type=int, default=10, help="device agents, each its own process")
    parser.add_argument("--rounds", type=int, default=40, help="training rounds (FedBuff: model versions)")
    parser.add_argument("--partition", default="dirichlet", choices=["dirichlet", "shards", "mcmahan", "iid"],
                        help="shards: label-aligned two-shard split; mcmahan: McMahan et al. 2017's exactly (sorted "
                             "by label, 2 equal shards per client)")
    parser.add_argument("--partition-file", default="",
                        help="a JSON list of per-client index lists into the task's training set (instead of "
                             "--partition)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller: more skew)")
    parser.add_argument("--local-epochs", type=int, default=3, help="epochs each device trains per round")
    parser.add_argument("--lr", type=float, default=0.0, help="devices' (and the baseline's) SGD learning rate "
                        "(default: the task's)")
    parser.add_argument("--lr-decay", type=float, default=0.97, help="learning rate multiplier per round")
    parser.add_argument("--batch-size", type=int, default=0, help="SGD batch size (default: the task's)")
    parser.add_argument("--hidden", default="", help="mlp tasks: hidden layer sizes, e.g. 64,32 (default: the task's)")
    parser.add_argument("--clients-per-round", type=int, default=0, help="K (default: 60 %% of the clients)")
    parser.add_argument("--over-selection", type=float, default=0.3, help="select K x (1 + this) devices")
    parser.add_argument("--holdout", type=float, default=0.2, help="each device's held-out fraction (evaluation)")
    parser.add_argument("--devices", default="realistic", choices=["realistic", "steady"],
                        help="realistic: some devices busy, on battery, metered or vanishing; steady: none")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the data split, the partition, the initial weights, selection and the devices' "
                             "shuffles")
    parser.add_argument("--dp", action="store_true", help="DP-FedAvg: clip updates, add Gaussian noise, report ε")
    parser.add_argument("--secagg", action="store_true",
                        help="secure aggregation (SecAgg+): the aggregator sees only the sum of the updates")
    parser.add_argument("--noise-multiplier", type=float, default=1.0, help="with --dp: noise std / clip norm")
    parser.add_argument("--clip-norm", type=float, default=0.3, help="with --dp: L2 bound of each update")
    from fedlite.aggregator.config import DEFAULT_ENCODING
    from fedlite.protocol.codecs import UPLINK

    parser.add_argument("--codec", default=DEFAULT_ENCODING,
                        help=f"update encoding, one of {', '.join(UPLINK)} (default {DEFAULT_ENCODING})")
    parser.add_argument("--mode", default="sync", choices=["sync", "fedbuff"],
                        help="synchronous rounds, or FedBuff (asynchronous; --rounds counts versions)")
    parser.add_argument("--stragglers", type=int, default=0, help="steady devices that train 5 x slower")
    parser.add_argument("--batch-seconds", type=float, default=0.0,
                        help="simulated device speed: each training batch takes at least this long")
    parser.add_argument("--aggregators", type=int, default=1,
                        help="aggregator processes sharing the work on one federation (default 1)")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/demo-<time>")


def run(args: argparse.Namespace) -> int:
    from fedlite.demo.datasets import TASKS
    from fedlite.demo.run import DemoPlan, run_demo

    if args.task not in TASKS:
        print(f"fedlite demo: unknown task {args.task!r}; choose from {', '.join(TASKS)}")
        return 2
    if args.clients < 2 or args.rounds < 1 or args.alpha <= 0:
        print("fedlite demo: need --clients >= 2, --rounds >= 1 and --alpha > 0")
        return 2
    from fedlite.protocol.codecs import UPLINK

    if args.codec not in UPLINK:
        print(f"fedlite demo: unknown codec {args.codec!r}; choose from {', '.join(UPLINK)}")
        return 2
    if args.secagg and (args.mode == "fedbuff" or args.aggregators > 1):
        print("fedlite demo: --secagg needs --mode sync and one aggregator (a masked sum is one cohort's, in one "
              "place)")
        return 2
    if args.dp and args.mode == "fedbuff":
        print("fedlite demo: --dp cannot be combined with --mode fedbuff yet")
        return 2
    if not 1 <= args.aggregators <= 16 or (args.aggregators > 1 and args.mode == "fedbuff"):
        print("fedlite demo: --aggregators must be 1 to 16, and 1 with --mode fedbuff")
        return 2
    if not 0 <= args.stragglers <= args.clients or not 0 <= args.batch_seconds <= 10:
        print(f"fedlite demo: need 0 <= --stragglers <= --clients ({args.clients}) and 0 <= --batch-seconds <= 10")
        return 2
    if args.noise_multiplier <= 0 or args.clip_norm <= 0:
        print("fedlite demo: need --noise-multiplier > 0 and --clip-norm > 0")
        return 2
    problem = _check_training(args, TASKS[args.task].arch)
    if problem:
        print(f"fedlite demo: {problem}")
        return 2
    run_dir = (args.run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    plan = DemoPlan(task=args.task, clients=args.clients, rounds=args.rounds, partition=args.partition,
                    alpha=args.alpha, local_epochs=args.local_epochs, seed=args.seed, dp=args.dp, secagg=args.secagg,
                    noise_multiplier=args.noise_multiplier, clip_norm=args.clip_norm, codec=args.codec,
                    mode=args.mode, stragglers=args.stragglers, batch_seconds=args.batch_seconds,
                    aggregators=args.aggregators, lr=args.lr, learning_rate_decay=args.lr_decay,
                    batch_size=args.batch_size, hidden=[int(h) for h in args.hidden.split(",")] if args.hidden else [],
                    clients_per_round=args.clients_per_round, over_selection=args.over_selection,
                    holdout=args.holdout, devices=args.devices, partition_file=args.partition_file)
    from fedlite.demo.partition import PartitionError

    try:
        run_demo(plan, run_dir)
    except PartitionError as exc:  # raised before any process starts
        print(f"fedlite demo: {exc}")
        return 2
    except KeyboardInterrupt:
        print("\nfedlite demo: interrupted; every process it started has been stopped")
        return 130
    return 0


def _check_training(args: argparse.Namespace, arch: str) -> str | None:
    """Why the training flags cannot run (None if they can)."""
    if args.lr < 0 or args.batch_size < 0 or not 0 < args.lr_decay <= 1:
        return "need --lr >= 0, --batch-size >= 0 and 0 < --lr-decay <= 1"
    if not 0 <= args.clients_per_round <= args.clients or not 0 <= args.over_selection <= 5:
        return f"need 0 <= --clients-per-round <= --clients ({args.clients}) and 0 <= --over-selection <= 5"
    if not 0 < args.holdout < 1:
        return "need 0 < --holdout < 1"
    if args.hidden:
        if arch != "mlp":
            return f"--hidden is for mlp tasks; --task {args.task} trains a {arch}"
        if not all(h.strip().isdigit() and int(h) > 0 for h in args.hidden.split(",")):
            return f"--hidden takes positive sizes separated by commas, not {args.hidden!r}"
    return None
