"""`fedlite agent`: run the device agent as a foreground service."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

# The configuration cannot be used; the error names the key. Restarting would fail the same way, so
# fedlite-agent.service lists it in RestartPreventExitStatus.
CONFIG_ERROR = 2
# The local data cannot be loaded (yet): the device's application may still write it, so systemd restarts.
DATA_ERROR = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="agent TOML file, e.g. /etc/fedlite/agent.toml")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="the least severe log lines written")
    parser.add_argument("--check", action="store_true",
                        help="check the config, data, pinned keys, gates, broker login and the data against the "
                             "broker's model, one line each, and exit (non-zero if any check fails)")


CHECK_FAILED = 1


def check(config: str) -> int:
    """`--check`: one line per check; 0 when none failed."""
    from fedlite.agent.preflight import FAIL, run_checks

    results = run_checks(config)
    for result in results:
        print(result.line(), flush=True)
    failed = [r for r in results if r.status == FAIL]
    print(f"{len(failed)} of {len(results)} checks failed" if failed else f"all {len(results)} checks passed")
    return CHECK_FAILED if failed else 0


def run(args: argparse.Namespace) -> int:
    if args.check:
        return check(args.config)
    from fedlite.agent.config import load_config
    from fedlite.agent.dataspec import DataError
    from fedlite.agent.service import Agent
    from fedlite.logs import configure_logging
    from fedlite.protocol.transport import LinkError
    from fedlite.runtime.interpreter import RuntimeMissing, probe_runtime
    from fedlite.settings import ConfigError

    configure_logging(args.log_level)
    try:
        config = load_config(args.config)
        probe_runtime()  # an install without a working TFLite runtime: a restart would not bring one
    except (ConfigError, RuntimeMissing) as exc:
        print(f"fedlite agent: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    try:
        agent = Agent(config, log_level=args.log_level)
    except DataError as exc:
        print(f"fedlite agent: {exc}", file=sys.stderr)
        return DATA_ERROR
    except (ConfigError, ValueError) as exc:  # an unreadable password_file, a bad trust.aggregator_keys file
        print(f"fedlite agent: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    try:
        agent.run()
    except LinkError as exc:
        logging.getLogger("fedlite.agent").error("%s", exc)
        return 1
    return 0

