"""A minimal HTTP/1.1 layer over asyncio streams: just enough for a JSON + SSE API.

The standard library has no asyncio HTTP server and the project takes no web framework, so
this reads one request (request line, headers, ``Content-Length`` body) and writes one
response per connection. Every response says ``Connection: close``: no keep-alive and no
chunked encoding, which keeps the parser small and makes "the client went away" simply
"the socket reached EOF".
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

MAX_HEADER_LINE_BYTES = 16 * 1024
MAX_HEADERS = 100
MAX_BODY_BYTES = 32 * 1024 * 1024  # a max_model_len of token ids as JSON fits easily

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 411: "Length Required", 413: "Payload Too Large",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 503: "Service Unavailable"}


class HTTPError(Exception):
    """A request the server refuses before routing; becomes a response with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class HTTPRequest:
    """One parsed request. Header names are lower-cased."""

    method: str
    path: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError as e:
        raise HTTPError(431, "request line or header too long") from e
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise ConnectionError("connection closed before a request arrived") from e
        raise HTTPError(400, "incomplete request head") from e
    if len(line) > MAX_HEADER_LINE_BYTES:
        raise HTTPError(431, "request line or header too long")
    return line.rstrip(b"\r\n")


async def read_request(reader: asyncio.StreamReader) -> HTTPRequest:
    """Parse one request from ``reader``.

    Raises:
        HTTPError: a malformed or unsupported request (answer it, then close).
        ConnectionError: the peer closed the connection before sending anything.
    """
    parts = (await _read_line(reader)).decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    while True:
        line = await _read_line(reader)
        if not line:
            break
        if len(headers) >= MAX_HEADERS:
            raise HTTPError(431, "too many headers")
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name.strip():
            raise HTTPError(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise HTTPError(501, "chunked request bodies are not supported; send Content-Length")
    body = b""
    if "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError as e:
            raise HTTPError(400, "Content-Length must be an integer") from e
        if length < 0:
            raise HTTPError(400, "Content-Length must not be negative")
        if length > MAX_BODY_BYTES:
            raise HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError as e:
            raise HTTPError(400, "request body shorter than Content-Length") from e
    path = target.split("?", 1)[0]  # no endpoint takes query parameters
    return HTTPRequest(method.upper(), path, version, headers, body)


def _head(status: int, content_type: str, extra: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
             f"Content-Type: {content_type}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def write_json(writer: asyncio.StreamWriter, status: int, payload: Any,
                     extra_headers: dict[str, str] | None = None) -> None:
    """Write a complete JSON response."""
    body = json.dumps(payload).encode()
    headers = {"Content-Length": str(len(body)), **(extra_headers or {})}
    writer.write(_head(status, "application/json", headers) + body)
    await writer.drain()


async def start_event_stream(writer: asyncio.StreamWriter) -> None:
    """Write the head of a Server-Sent Events response; the body ends when we close."""
    writer.write(_head(200, "text/event-stream", {"Cache-Control": "no-cache"}))
    await writer.drain()


async def write_event(writer: asyncio.StreamWriter, data: Any) -> None:
    """One SSE event: ``data: <json>`` (or a raw string such as ``[DONE]``) and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data)
    writer.write(f"data: {text}\n\n".encode())
    await writer.drain()
