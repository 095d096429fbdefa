"""Helpers of the server tests: a server on its own event loop in a thread, and small HTTP clients."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from typing import Any

from minivllm.entrypoints.openai.server import OpenAIServer
from minivllm.entrypoints.openai.settings import ServerSettings


class ServerThread:
    """An OpenAIServer on its own event loop in a daemon thread (the engine is not owned)."""

    def __init__(self, engine: Any, name: str, settings: ServerSettings | None = None) -> None:
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = OpenAIServer(engine, name, settings)
        _, self.port = self.call(self.server.start("127.0.0.1", 0))

    def call(self, coro: Any, timeout_s: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def submit(self, coro: Any):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stats(self) -> dict:
        return self.call(self.engine.stats())

    def stop(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def request(port: int, method: str, path: str, body: Any = None, raw: bytes | None = None,
            headers: dict[str, str] | None = None, timeout_s: float = 60.0) -> tuple[int, Any]:
    """One request on a fresh connection; the JSON body (or text when it is not JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text.decode(errors="replace")
    finally:
        conn.close()


def stream(port: int, path: str, body: dict, headers: dict[str, str] | None = None) -> list[str]:
    """The ``data:`` payloads of an SSE response, in order."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert resp.getheader("Content-Type").startswith("text/event-stream")
        text = resp.read().decode()
    finally:
        conn.close()
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


def completion_ok(port: int, prompt: list[int] | str = (1, 2, 3), max_tokens: int = 4) -> dict:
    """A small request that must succeed: the proof that the server still serves."""
    status, body = request(port, "POST", "/v1/completions",
                           {"prompt": list(prompt) if not isinstance(prompt, str) else prompt,
                            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert status == 200, body
    assert len(body["choices"][0]["token_ids"]) == max_tokens
    return body
