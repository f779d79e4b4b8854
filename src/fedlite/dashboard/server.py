"""The dashboard's HTTP server: one page, its static assets, and a read-only JSON API (Starlette on uvicorn).

Endpoints (all ``GET``/``HEAD``; any other method gets ``405``; with a token set, every one needs it — see
`fedlite.dashboard.auth`):

``/``
    The operator's page (``static/index.html``); it polls ``/api/state`` every 1.5 s.
``/static/...``
    The page's script, style sheet and the bundled Chart.js (no CDN: it works offline).
``/api/state``
    Everything the page shows, read fresh from the state_dir::

        {
          "now": unix seconds (server clock: the page computes "12 s ago" against it),
          "state_dir": str,
          "files": {"history"|"fleet"|"registry": {"present": bool, "stale": bool, "error": str|null}},
          "rounds": [ {round, status, close_reason, selected, accepted, declined, declined_by_gate {gate: n}, aborted,
                       timed_out (silent when the deadline passed), cut_off (still training when the round closed
                       before it, having its K updates; 0 in history written before it was counted),
                       rejected {reason: n}, bytes_up, bytes_down, accuracy, loss, duration_seconds,
                       started_at, completed_at, epsilon, delta,
                       kpis: {successful_client_rounds, cumulative_successful_client_rounds,
                              bytes_per_accuracy_point, epsilon, client_accuracy_mean, client_accuracy_std,
                              client_accuracy_p10, present: bool}} ... ],   (fields absent from the file are absent)
          "totals": {rounds, complete, abandoned, successful_client_rounds, bytes_up, bytes_down, timed_out, cut_off,
                     declined_by_gate, rejected, accuracy, loss, epsilon, bytes_per_accuracy_point},
          "latest": null | {round, client_accuracies [..], client_metrics {client: {metric: value}},
                            update_norms {client: norm}, cosine_similarity {client: value}, drift_flags [..],
                            anomaly_flags [..], client_accuracy_mean, client_accuracy_std, client_accuracy_p10},
          "fleet": null | fleet.json as written by the aggregator, judged again now (`state.judge_liveness`):
                   each device gets ``liveness`` (online | training | stale | offline) and ``liveness_reason``:
                   offline if its last status said so; stale once the run has ended (``run_ended``: the
                   file's ``ended_at``, or its ``updated_at`` once older than ``status_ttl_seconds``) or when its
                   ``last_seen`` is older than ``status_ttl_seconds`` ([rounds] status_ttl_seconds, 90 s by
                   default); ``stale`` is true unless online or training; ``counts`` are recounted from them
                   (known, online, eligible, training, stale, offline),
          "registry": null | registry.json as written by the model registry
        }

    The per-client fairness numbers come from the record's ``kpis`` block, or are derived from ``client_metrics``
    (``eval_accuracy_before``) for records without one. Non-finite numbers become ``null``.
``/api/history``, ``/api/fleet``, ``/api/registry``
    The raw files (``history.json`` as a list, ``[]`` when missing; the others ``null`` when missing).

Responses carry ``Cache-Control: no-store`` and a strict Content-Security-Policy (same-origin only).
`start_dashboard` runs the server in a background thread (for the demo and tests); `fedlite dashboard` in the
foreground (`fedlite.dashboard.cli`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedlite.dashboard.auth import TokenAuth, check_binding, is_loopback
from fedlite.dashboard.state import DashboardState

STATIC = Path(__file__).resolve().parent / "static"
POLL_SECONDS = 1.5

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]

log = logging.getLogger("fedlite.dashboard")


class ReadOnly:
    """ASGI middleware: only GET and HEAD; security headers on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *((k, v) for k, v in SECURITY_HEADERS if k not in names)]
            await send(message)

        if scope["method"] not in ("GET", "HEAD"):
            response = Response("read-only dashboard: GET only\n", 405, headers={"Allow": "GET, HEAD"},
                                media_type="text/plain")
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def _json(value: Any) -> JSONResponse:
    return JSONResponse(value)


def create_app(state_dir: Path, token: str | None = None) -> Starlette:
    """The ASGI application for one state_dir (`token` None: no token check; see `fedlite.dashboard.auth`)."""
    state = DashboardState(Path(state_dir))

    def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    def api_state(request: Request) -> Response:
        return _json(state.snapshot())

    def api_history(request: Request) -> Response:
        return _json(state.history())

    def api_fleet(request: Request) -> Response:
        return _json(state.fleet())

    def api_registry(request: Request) -> Response:
        return _json(state.registry())

    def healthz(request: Request) -> Response:
        """For probes (no token needed, nothing private): the state dir is readable."""
        ok = Path(state_dir).is_dir()
        return JSONResponse({"status": "ok" if ok else "no state dir"}, status_code=200 if ok else 503)

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/api/state", api_state),
        Route("/api/history", api_history),
        Route("/api/fleet", api_fleet),
        Route("/api/registry", api_registry),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    # Outermost first: the method check and headers wrap the auth check, which wraps the routes.
    middleware = [Middleware(ReadOnly), Middleware(TokenAuth, token=token)]
    return Starlette(routes=routes, middleware=middleware)


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket in the caller's thread, so a busy port fails here rather than in the server."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


@dataclass
class DashboardHandle:
    """A dashboard running in a background thread: `.url` to open, `.stop()` to end it."""

    host: str
    port: int
    url: str
    token: str | None
    server: Any = field(repr=False)
    thread: threading.Thread = field(repr=False)

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def wait(self) -> None:
        """Block until the server stops (a signal handler may call `stop`)."""
        while self.thread.is_alive():
            self.thread.join(0.5)

    def __enter__(self) -> DashboardHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_dashboard(state_dir: str | Path, host: str = "127.0.0.1", port: int = 8080,
                    token: str | None = None, startup_timeout: float = 10.0) -> DashboardHandle:
    """Serve the dashboard for `state_dir` in a daemon thread; `port` 0 picks a free one.

    Raises `fedlite.dashboard.auth.AuthError` for a non-loopback `host` without a token, and `OSError` when the
    address cannot be bound.
    """
    import uvicorn

    check_binding(host, token)
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(Path(state_dir), token), log_level="warning", access_log=False,
                            lifespan="off", server_header=False, proxy_headers=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fedlite-dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        sock.close()
        raise RuntimeError(f"the dashboard did not start on {host}:{bound_port}")
    url = f"http://{_url_host(host)}:{bound_port}/"
    if not is_loopback(host):
        log.info("dashboard on %s:%d (token required)", host, bound_port)
    return DashboardHandle(host=host, port=bound_port, url=url, token=token, server=server, thread=thread)
