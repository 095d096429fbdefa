"""The checks every request passes before routing, and the access log (one pure-ASGI layer).

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``: it leaves streaming responses and
client-disconnect detection alone and costs one function call per request.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from minivllm.entrypoints.openai.protocol import error_body
from minivllm.entrypoints.openai.settings import ServerSettings

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

access_logger = logging.getLogger("minivllm.access")

# Liveness probes must work without credentials (a supervisor has none).
OPEN_PATHS = frozenset({"/health", "/ping"})


def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


async def send_error(send: Callable[[dict], Awaitable[None]], status: int, message: str,
                     error_type: str, extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A complete JSON error response that also closes the connection (the request body, if
    any, was not read, so the connection cannot be reused)."""
    body = json.dumps(error_body(message, error_type, status)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *(extra_headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Auth (Bearer ``api_key``), ``application/json`` POSTs (415), ``Content-Length`` over the
    body limit (413), ``Connection: close`` while draining, and one access-log line per request."""

    def __init__(self, app: ASGIApp, settings: ServerSettings, is_draining: Callable[[], bool]) -> None:
        self.app = app
        self.settings = settings
        self.is_draining = is_draining
        self._expected_auth = (f"Bearer {settings.api_key}".encode()
                               if settings.api_key is not None else None)

    def _rejection(self, scope: dict) -> tuple[int, str, str, list] | None:
        path, method = scope["path"], scope["method"]
        if self._expected_auth is not None and path not in OPEN_PATHS and method != "OPTIONS":
            given = (_header(scope, b"authorization") or "").encode("latin-1")
            if not hmac.compare_digest(given, self._expected_auth):
                return 401, "invalid or missing API key", "authentication_error", [(b"www-authenticate", b"Bearer")]
        if method == "POST":
            ctype = (_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                # A browser may POST text/plain cross-origin without a preflight; JSON only
                # keeps web pages from driving a local server.
                return 415, "Content-Type must be application/json", "invalid_request_error", []
            length = _header(scope, b"content-length")
            if length is not None and length.strip().isdigit() \
                    and int(length) > self.settings.max_request_body_bytes:
                return (413, f"request body over {self.settings.max_request_body_bytes} bytes",
                        "invalid_request_error", [])
        return None

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: list[int] = [0]

        async def send_logged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if self.is_draining():
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            rejection = self._rejection(scope)
            if rejection is not None:
                code, message, error_type, headers = rejection
                await send_error(send_logged, code, message, error_type, headers)
            else:
                await self.app(scope, receive, send_logged)
        except Exception:
            status[0] = status[0] or 500  # a bug: the outermost handler answers 500
            raise
        finally:
            if self.settings.access_log:
                client = scope.get("client")
                who = f"{client[0]}:{client[1]}" if client else "-"
                access_logger.info('%s "%s %s HTTP/%s" %d %.1fms', who, scope["method"], scope["path"],
                                   scope.get("http_version", "1.1"), status[0] or 499,
                                   1000 * (time.perf_counter() - start))
