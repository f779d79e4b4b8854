"""`fedlite dashboard`: serve the operator's web dashboard for one federation's state_dir (read-only)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, required=True,
                        help="the aggregator's state_dir (history.json, fleet.json, registry.json)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default loopback; any other address requires a token)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (0: any free port)")
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument("--token", default=None, help="bearer token every request must carry (visible in ps: "
                                                      "prefer --token-file)")
    tokens.add_argument("--token-file", type=Path, default=None, help="file whose first line is the token")


def run(args: argparse.Namespace) -> int:
    from fedlite.dashboard.auth import AuthError, load_token
    from fedlite.dashboard.server import start_dashboard

    try:
        token = load_token(args.token, args.token_file)
        if not args.state_dir.is_dir():
            print(f"fedlite dashboard: note: {args.state_dir} does not exist yet; the page fills in once the "
                  "aggregator writes it", file=sys.stderr)
        handle = start_dashboard(args.state_dir, args.host, args.port, token=token)
    except AuthError as exc:
        print(f"fedlite dashboard: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fedlite dashboard: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: handle.stop())
    signal.signal(signal.SIGINT, lambda *_: handle.stop())
    where = handle.url if token is None else f"{handle.url} (open it once with ?token=<token>)"
    if args.host in ("0.0.0.0", "::"):
        where += f"; listening on all interfaces, port {handle.port}"
    print(f"fedlite dashboard: {args.state_dir} on {where}; Ctrl-C to stop", flush=True)
    handle.wait()
    return 0
