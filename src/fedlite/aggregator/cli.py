"""`fedlite aggregator`: run one federation's rounds as a foreground service."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

# The configuration cannot be used; the error names the key. Restarting would fail the same way, so
# fedlite-aggregator.service lists it in RestartPreventExitStatus.
CONFIG_ERROR = 2
# The state directory cannot be written (full, read-only, ...), or it holds a history without a checkpoint to
# resume it from: a restart would only retrain a round it cannot save, or start the federation over.
# fedlite-aggregator.service lists it in RestartPreventExitStatus.
STORAGE_FAILURE = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="aggregator TOML file")
    parser.add_argument("--member", default="", metavar="NAME",
                        help="this aggregator's name among several on one federation (sets [cluster] member)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="the least severe log lines written")
    parser.add_argument("--reset", action="store_true",
                        help="start the federation over: move the state directory's checkpoints, history, exported "
                             "rounds and registry aside (into state_dir/previous-<time>/) first")


def run(args: argparse.Namespace) -> int:
    from fedlite.aggregator.cluster.run import ClusterProcess
    from fedlite.aggregator.config import load_config
    from fedlite.aggregator.service import Aggregator, RunFailed
    from fedlite.fsutil import StorageError
    from fedlite.logs import configure_logging
    from fedlite.protocol.transport import LinkError
    from fedlite.settings import ConfigError

    configure_logging(args.log_level)
    log = logging.getLogger("fedlite.aggregator")
    try:
        config = load_config(args.config, args.member)
        if args.reset:
            _reset(config.federation.state_dir, log)
        aggregator = ClusterProcess(config) if config.cluster.member else Aggregator(config)
    except StorageError as exc:
        _storage_failure(log, exc)
        return STORAGE_FAILURE
    except (ConfigError, OSError, ValueError) as exc:
        print(f"fedlite aggregator: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    signal.signal(signal.SIGTERM, lambda *_: aggregator.stop())
    signal.signal(signal.SIGINT, lambda *_: aggregator.stop())
    try:
        aggregator.run()
    except StorageError as exc:  # CheckpointError and ResumeRefused included
        _storage_failure(log, exc)
        return STORAGE_FAILURE
    except (LinkError, RunFailed) as exc:
        log.error("%s", exc)
        return 1
    return 0


def _reset(state_dir: str, log: logging.Logger) -> None:
    from fedlite.aggregator.state_dir import reset_state

    moved = reset_state(state_dir)
    if moved is None:
        log.info("--reset: no previous state in %s", state_dir)
    else:
        log.warning("--reset: moved the previous state (%s) to %s; the federation starts over at round 1",
                    ", ".join(moved[1]), moved[0])


def _storage_failure(log: logging.Logger, exc: Exception) -> None:
    from fedlite.aggregator.checkpoint import ResumeRefused

    log.error("%s" if isinstance(exc, ResumeRefused) else "%s; not restarting until the storage is fixed", exc)
