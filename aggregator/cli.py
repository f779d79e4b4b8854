"""`fedlite aggregator`: run one federation's rounds as a foreground service."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

# The configuration cannot be used; the error names the key. Restarting would fail the same way, so
# fedlite-aggregator.service lists it in RestartPreventExitStatus.
CONFIG_ERROR = 2
# The checkpoint directory cannot be written: a restart would only retrain a round it cannot save.
# fedlite-aggregator.service lists it in RestartPreventExitStatus.
STORAGE_FAILURE = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="aggregator TOML file")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace) -> int:
    from fedlite.aggregator.checkpoint import CheckpointError
    from fedlite.aggregator.config import load_config
    from fedlite.aggregator.service import Aggregator, RunFailed
    from fedlite.logs import configure_logging
    from fedlite.protocol.transport import LinkError
    from fedlite.settings import ConfigError

    configure_logging(args.log_level)
    try:
        aggregator = Aggregator(load_config(args.config))
    except (ConfigError, OSError, ValueError) as exc:
        print(f"fedlite aggregator: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    signal.signal(signal.SIGTERM, lambda *_: aggregator.stop())
    signal.signal(signal.SIGINT, lambda *_: aggregator.stop())
    try:
        aggregator.run()
    except CheckpointError as exc:
        logging.getLogger("fedlite.aggregator").error("%s; not restarting until the storage is fixed", exc)
        return STORAGE_FAILURE
    except (LinkError, RunFailed) as exc:
        logging.getLogger("fedlite.aggregator").error("%s", exc)
        return 1
    return 0
