"""`fedlite agent`: run the device agent as a foreground service."""

from __future__ import annotations

import argparse
import logging
import signal
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="agent TOML file, e.g. /etc/fedlite/agent.toml")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace) -> int:
    from fedlite.agent.config import load_config
    from fedlite.agent.data import DataError
    from fedlite.agent.service import Agent
    from fedlite.logs import configure_logging
    from fedlite.protocol.transport import LinkError
    from fedlite.settings import ConfigError

    configure_logging(args.log_level)
    try:
        agent = Agent(load_config(args.config))
    except (ConfigError, DataError) as exc:
        print(f"fedlite agent: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    try:
        agent.run()
    except LinkError as exc:
        logging.getLogger("fedlite.agent").error("%s", exc)
        return 1
    return 0

