"""Shutdown and engine death: drain, abort at the deadline, SIGTERM, and exit on a dead core."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from minivllm.entrypoints.openai.server import ENGINE_DEAD, OpenAIServer
from minivllm.entrypoints.openai.settings import ServerSettings
from tests.server.conftest import CHAT_NAME
from tests.server.helpers import ServerThread, completion_ok, request

REPO = Path(__file__).resolve().parents[2]


def _open_stream(port: int, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    return conn, resp


def _rest_of_stream(resp: http.client.HTTPResponse) -> list[str]:
    return [e[len("data: "):] for e in resp.read().decode().split("\n\n") if e.startswith("data: ")]


def test_drain_lets_in_flight_requests_finish(tiny_chat_engine):
    srv = ServerThread(tiny_chat_engine, CHAT_NAME)
    conn, resp = _open_stream(srv.port, {"prompt": [1, 2, 3], "max_tokens": 60, "ignore_eos": True})
    done = srv.submit(srv.server.shutdown(drain_timeout_s=60))
    events = _rest_of_stream(resp)
    conn.close()
    done.result(60)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    with pytest.raises(OSError):  # no longer accepting
        request(srv.port, "GET", "/health", timeout_s=5)
    srv.stop()


def test_drain_deadline_ends_streams_with_an_error_and_others_with_503(tiny_chat_engine):
    srv = ServerThread(tiny_chat_engine, CHAT_NAME)
    conn, resp = _open_stream(srv.port, {"prompt": [1, 2, 3], "max_tokens": 450, "ignore_eos": True})
    other: dict = {}
    worker = threading.Thread(target=lambda: other.update(r=request(
        srv.port, "POST", "/v1/completions", {"prompt": [4, 5], "max_tokens": 450, "ignore_eos": True})))
    worker.start()
    deadline = time.monotonic() + 30
    while srv.server.serving.num_in_flight < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    srv.call(srv.server.shutdown(drain_timeout_s=0.2))
    events = _rest_of_stream(resp)
    conn.close()
    worker.join(30)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == 503
    status, body = other["r"]
    assert status == 503 and "shutting down" in body["error"]["message"]
    srv.stop()
    stats = asyncio.run(tiny_chat_engine.stats())
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0  # aborted in the engine too


class _FlakyEngine:
    """Just enough engine for the server; ``errored`` flips when the test says so."""

    max_model_len = 64
    tokenizer = None
    errored = False

    async def check_health(self) -> None:
        pass

    async def stats(self, timeout_s: float = 1.0) -> dict:
        return {}


def test_server_stops_when_the_engine_dies():
    engine = _FlakyEngine()

    async def main() -> str:
        server = OpenAIServer(engine, "x", ServerSettings(engine_poll_interval_s=0.05))
        await server.start("127.0.0.1", 0)
        asyncio.get_running_loop().call_later(0.2, setattr, engine, "errored", True)
        reason = await asyncio.wait_for(server.wait(), 30)
        await server.shutdown()
        return reason

    assert asyncio.run(main()) == ENGINE_DEAD


def _start_cli(model_dir: str, *flags: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "minivllm.entrypoints.cli", "serve", model_dir, "--device", "cpu", "--port", "0",
         "--served-model-name", CHAT_NAME, *flags],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError("server exited during start-up:\n" + "".join(lines))
        lines.append(line)
        if line.startswith("minivllm: serving"):
            port = int(line.rsplit(":", 1)[1].strip().rstrip("/"))
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, port
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def test_sigterm_drains_and_exits_0(tiny_chat_dir):
    proc, port = _start_cli(tiny_chat_dir, "--shutdown-timeout", "0.5")
    try:
        completion_ok(port)
        conn, resp = _open_stream(port, {"prompt": [1, 2, 3], "max_tokens": 450, "ignore_eos": True, "n": 4})
        proc.send_signal(signal.SIGTERM)
        events = _rest_of_stream(resp)
        conn.close()
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["error"]["code"] == 503 and "shutting down" in last["error"]["message"]
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_9_of_the_core_makes_the_server_exit_non_zero(tiny_chat_dir):
    proc, port = _start_cli(tiny_chat_dir)
    try:
        completion_ok(port)
        cores = [c for c in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
                 and b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(cores) == 1, cores
        os.kill(cores[0], signal.SIGKILL)
        assert proc.wait(60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
