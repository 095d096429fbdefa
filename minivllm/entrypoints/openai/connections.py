"""uvicorn's h11 protocol with the connection limits it lacks: a cap on open sockets, an idle
timeout from the first byte, and a deadline for reading a request.

Plain uvicorn arms its keep-alive timer only after a response, so a socket that never sends a
byte (or sends a header a byte a second) stays open for ever; enough of them exhaust the file
descriptors. Here every connection is, at every moment, either idle (closed after
``timeout_keep_alive_s``), reading a request (closed after ``timeout_request_read_s`` from its
first byte), or being answered (the application's business).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("minivllm.server")



def _raw_response(status: int, reason: str, message: str, error_type: str) -> bytes:
    """A complete ``Connection: close`` JSON error response, for when no request cycle exists."""
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None,
                                 "code": status}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


_REFUSED = _raw_response(503, "Service Unavailable", "too many open connections", "server_error")
_TIMED_OUT = _raw_response(408, "Request Timeout", "request not received in time", "invalid_request_error")


class RateLimitedLog:
    """At most one warning per ``interval_s`` per message: a flood of bad clients must not
    become a flood of log lines."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, message: str) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(message, (-1e9, 0))
        if now - last < self.interval_s:
            self._last[message] = (last, suppressed + 1)
            return
        self._last[message] = (now, 0)
        logger.warning("%s%s", message, f" ({suppressed} more since the last report)" if suppressed else "")


class RepeatFilter(logging.Filter):
    """Lets a given log message through at most once per ``interval_s`` (uvicorn warns once
    per malformed request, which a hostile client can repeat at will)."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        key = str(record.msg)
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval_s:
            return False
        self._last[key] = now
        return True


def install_repeat_filter(logger_name: str = "uvicorn.error") -> None:
    """Attach one RepeatFilter to ``logger_name`` (idempotent)."""
    target = logging.getLogger(logger_name)
    if not any(isinstance(f, RepeatFilter) for f in target.filters):
        target.addFilter(RepeatFilter())


class GuardedH11Protocol(H11Protocol):
    """One HTTP/1.1 connection (h11), with the limits above. Built by uvicorn through
    ``functools.partial(GuardedH11Protocol, limits=...)``."""

    def __init__(self, *args: Any, max_connections: int, timeout_request_read_s: float,
                 log: RateLimitedLog, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.timeout_request_read_s = timeout_request_read_s
        self.log = log
        self._read_deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            # Refuse at once: a socket held open is what exhausts the descriptors.
            self._refused = True
            self.log.warning(f"refusing connections: {self.max_connections} already open")
            transport.write(_REFUSED)
            transport.close()
            return
        # A fresh connection is idle until its first byte: the keep-alive timer applies.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._read_deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._read_deadline = self.loop.call_later(self.timeout_request_read_s, self._read_timed_out)
        super().data_received(data)
        if self._read_deadline is not None and self.cycle is not None and not self.cycle.more_body \
                and not self.cycle.response_complete:
            self._cancel_read_deadline()  # the whole request is in

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._cancel_read_deadline()  # answered early (e.g. 413 before the body arrived)
        super().on_response_complete()

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        self.log.warning(f"closing connections whose request took over {self.timeout_request_read_s:g} s to arrive")
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            self.transport.write(_TIMED_OUT)
        self.transport.close()
