"""Who may read the dashboard: loopback by default, a bearer token whenever it listens beyond loopback.

Rules (enforced by `TokenAuth`, an ASGI middleware, and by `check_binding` before the server starts):

- Bound to a loopback address (127.0.0.0/8, ::1, ``localhost``) the dashboard may run without a token; it then
  accepts only requests whose ``Host`` header names a loopback host, so a web page elsewhere cannot read it
  through DNS rebinding.
- Bound to anything else (a LAN address, ``0.0.0.0``, ``::``, a host name) it refuses to start without a token.
- With a token, every request must carry it: ``Authorization: Bearer <token>``, or the ``fedlite_dashboard``
  cookie. Opening any page with ``?token=<token>`` once sets that cookie (HttpOnly, SameSite=Strict) and
  redirects to the same address without the token, so it does not linger in the address bar or history.
  Anything else gets ``401``. Tokens are compared in constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hmac
import ipaddress
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "fedlite_dashboard"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
MIN_TOKEN_LENGTH = 16


class AuthError(ValueError):
    """The dashboard must not start with these settings."""


def is_loopback(host: str) -> bool:
    """True for a loopback IP literal or the name localhost; False for wildcards, LAN addresses and other names."""
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_token(token: str | None, token_file: str | Path | None) -> str | None:
    """The token from --token or --token-file (first line, stripped); None when neither is given."""
    if token is not None and token_file is not None:
        raise AuthError("give --token or --token-file, not both")
    if token_file is not None:
        try:
            lines = Path(token_file).read_text().splitlines()
        except OSError as exc:
            raise AuthError(f"cannot read the token file {token_file}: {exc.strerror or exc}") from exc
        token = lines[0] if lines else ""
    if token is None:
        return None
    token = token.strip()
    if not token:
        raise AuthError("the token is empty")
    if len(token) < MIN_TOKEN_LENGTH:
        raise AuthError(f"the token is too short ({len(token)} characters; use at least {MIN_TOKEN_LENGTH}, "
                        "e.g. from: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def check_binding(host: str, token: str | None) -> None:
    """Refuse a non-loopback address without a token."""
    if token is None and not is_loopback(host):
        raise AuthError(f"refusing to listen on {host} without a token: beyond loopback every request must carry "
                        "one. Pass --token-file FILE (or --token TOKEN), or bind to 127.0.0.1")


def token_matches(expected: str, given: str | None) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8", "surrogateescape"))


def _bearer(headers: Headers) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, credentials = value.partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


def _cookie(headers: Headers) -> str | None:
    raw = headers.get("cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:  # a malformed Cookie header is simply no credential
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel else None


def _host_name(headers: Headers) -> str:
    host = headers.get("host", "")
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class TokenAuth:
    """ASGI middleware: the token check (when a token is set) or the loopback Host check (when not)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = self.check(scope)
        if response is not None:
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> Response | None:
        if scope.get("path") == "/healthz":  # probes: nothing private there
            return None
        headers = Headers(scope=scope)
        if self.token is None:
            if is_loopback(_host_name(headers)):
                return None
            return PlainTextResponse("forbidden: this dashboard answers only to loopback host names\n", 403)
        if token_matches(self.token, _bearer(headers)) or token_matches(self.token, _cookie(headers)):
            return None
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = next((v for k, v in query if k == "token"), None)
        if token_matches(self.token, given):
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            response = RedirectResponse(scope.get("path", "/") + (f"?{rest}" if rest else ""), status_code=303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict", path="/",
                                secure=scope.get("scheme") == "https")
            return response
        return PlainTextResponse("unauthorized: this dashboard needs its token (Authorization: Bearer <token>, "
                                 "or open it once with ?token=<token>)\n", 401,
                                 headers={"WWW-Authenticate": 'Bearer realm="fedlite dashboard"'})
