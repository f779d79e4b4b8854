"""The dashboard inside another command (the demo): loopback only, a free port, never fatal.

Kept free of web-framework imports so a caller can import it unconditionally: without the ``server`` extra
(Starlette, uvicorn) it says so and returns None.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

PREFERRED_PORT = 8080


def start_for_demo(state_dir: str | Path, say: Callable[[str], Any] = print, host: str = "127.0.0.1",
                   port: int = PREFERRED_PORT) -> Any:
    """Start the dashboard for `state_dir` on `host`:`port` (any free port if that one is taken) and print its URL.

    Returns the `DashboardHandle` (call `.stop()`), or None when the dashboard cannot run here.
    """
    try:
        from fedlite.dashboard.server import start_dashboard
    except ImportError as exc:
        say(f"dashboard: not started ({exc.name or exc} is not installed: pip install 'fedlite[server]')")
        return None
    try:
        try:
            handle = start_dashboard(state_dir, host, port)
        except OSError:
            handle = start_dashboard(state_dir, host, 0)
    except (OSError, RuntimeError) as exc:
        say(f"dashboard: not started ({exc})")
        return None
    say(f"dashboard: {handle.url} (live rounds, fleet, KPIs; read-only, loopback only)")
    return handle
