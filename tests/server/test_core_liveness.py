"""The server over an engine core that stalls or is left: a stopped core turns /health into 503
and back, and a client that leaves during a long prefill frees the engine for the next one."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from tests.server.helpers import ServerThread, completion_ok, request

LIVENESS_S = 60.0  # generous bounds: these tests prove liveness, not speed


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + LIVENESS_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def short_heartbeat_server(tiny_chat_dir):
    from minivllm import AsyncLLM

    engine = AsyncLLM(tiny_chat_dir, device="cpu", heartbeat_timeout_s=2.0,
                      max_num_batched_tokens=32)
    srv = ServerThread(engine, "tiny-chat")
    yield srv
    srv.stop()
    engine.shutdown()


def test_stopped_core_is_503_then_200_after_sigcont(short_heartbeat_server):
    port = short_heartbeat_server.port
    pid = short_heartbeat_server.engine.client.proc.pid
    assert request(port, "GET", "/health")[0] == 200
    os.kill(pid, signal.SIGSTOP)
    try:
        _wait_for(lambda: request(port, "GET", "/health", timeout_s=10)[0] == 503, "/health 503")
    finally:
        os.kill(pid, signal.SIGCONT)
    _wait_for(lambda: request(port, "GET", "/health", timeout_s=10)[0] == 200, "/health 200 again")
    completion_ok(port)


def _aborted(port: int) -> float:
    """``minivllm:request_success_total{finished_reason="abort"}`` from /metrics."""
    status, text = request(port, "GET", "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith("minivllm:request_success_total{") and 'finished_reason="abort"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_client_leaving_a_long_prefill_frees_the_engine(short_heartbeat_server):
    """480 prompt tokens at 32 per step: the client leaves after the stream starts; the request
    is aborted at the next step instead of running its prefill and 30 tokens to the end."""
    srv = short_heartbeat_server
    aborted_before = _aborted(srv.port)
    body = json.dumps({"prompt": list(range(1000, 1480)), "max_tokens": 30, "stream": True,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        _wait_for(lambda: srv.stats()["num_running"] == 1, "the request to be running")
    # The socket is closed mid-prefill: the server notices and aborts the request in the core.
    _wait_for(lambda: srv.stats()["num_running"] + srv.stats()["num_waiting"] == 0,
              "the abandoned request to leave the engine")
    _wait_for(lambda: _aborted(srv.port) == aborted_before + 1, "the abort to be counted")
    out = completion_ok(srv.port, max_tokens=4)
    assert out["usage"]["completion_tokens"] == 4
