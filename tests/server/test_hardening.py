"""What a hostile client sends (issue 8, HTTP side); after each case the server still serves."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

from tests.server.conftest import STRICT
from tests.server.helpers import completion_ok, request

AUTH = {"Authorization": "Bearer sekret"}


def _raw(port: int, data: bytes, timeout_s: float = 30.0) -> bytes:
    """Send ``data`` as is and read until the server closes."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        try:
            s.sendall(data)
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:  # the server closed with our bytes unread: also a refusal
            pass
    return out


def _post_raw(port: int, body: bytes) -> bytes:
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return _raw(port, head + body)


def test_huge_n_and_huge_batch(chat_server):
    status, body = request(chat_server.port, "POST", "/v1/completions", {"prompt": [1, 2], "n": 20000})
    assert status == 400 and body["error"]["param"] == "n" and "--max-n" in body["error"]["message"]
    status, body = request(chat_server.port, "POST", "/v1/completions", {"prompt": [[1, 2]] * 5000})
    assert status == 400 and "--max-prompts-per-request" in body["error"]["message"]
    completion_ok(chat_server.port)


def test_deep_json_and_lone_surrogates(chat_server):
    port = chat_server.port
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, body = request(port, "POST", "/v1/completions", raw=deep)
    assert status == 400 and "JSON" in body["error"]["message"]
    for raw in (b'{"prompt": "a\\ud800b", "max_tokens": 2}', b'{"prompt": "\\udfff", "max_tokens": 2}',
                b'{"messages": [{"role": "user", "content": "x\\ud83d"}], "max_tokens": 2}',
                b'{"prompt": "\xff\xfe invalid utf-8", "max_tokens": 2}'):
        path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
        status, body = request(port, "POST", path, raw=raw)
        assert status == 400, (raw, body)
    # A valid surrogate pair is just an emoji.
    status, body = request(port, "POST", "/v1/completions", raw=b'{"prompt": "\\ud83d\\ude00", "max_tokens": 2}')
    assert status == 200, body
    completion_ok(port)


def test_no_tracebacks_or_paths_in_error_bodies(chat_server):
    cases = [b'{"prompt": ', b'{"prompt": [1, 2], "temperature": -1}', b'{"prompt": [99999999]}',
             b'{"messages": [{"role": "wizard", "content": "hi"}]}', b'{"messages": [{"role": "user"}]}']
    for raw in cases:
        path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
        status, body = request(chat_server.port, "POST", path, raw=raw)
        assert status == 400, (raw, body)
        text = json.dumps(body)
        assert "Traceback" not in text and ".py" not in text and "/" not in body["error"]["message"], text


def test_lying_content_length_times_out_and_the_server_serves(strict_server):
    port = strict_server.port
    start = time.monotonic()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer sekret\r\nContent-Length: 100\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + b'{"prompt":')
        # /health answers while that request waits for its body.
        assert request(port, "GET", "/health") == (200, {})
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 408"), out
    assert time.monotonic() - start < STRICT.timeout_request_read_s + 20
    assert request(port, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 1}, headers=AUTH)[0] == 200


def test_idle_and_slow_sockets_are_closed_after_the_timeout(strict_server):
    port = strict_server.port
    socks = []
    for i in range(200):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        if i % 2:  # half send a partial request head, a slowloris
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    assert request(port, "GET", "/health") == (200, {})  # served while they wait
    start = time.monotonic()
    closed = 0
    for s in socks:
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), data
        closed += 1
        s.close()
    assert closed == 200
    assert time.monotonic() - start < STRICT.timeout_request_read_s + 25
    assert request(port, "GET", "/health") == (200, {})


def test_connections_beyond_the_cap_are_refused_at_once(strict_server):
    port = strict_server.port
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(STRICT.max_open_connections + 20)]
    try:
        refused = 0
        for s in socks[-20:]:
            data = s.recv(4096)
            assert data.startswith(b"HTTP/1.1 503"), data
            refused += 1
        assert refused == 20
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)  # let the server notice the closes
    assert request(port, "GET", "/health") == (200, {})


def test_multi_megabyte_prompt_is_refused_fast_while_health_answers(chat_server):
    port = chat_server.port
    prompt = "lorem ipsum " * 400_000  # 4.8 MB
    result: dict = {}

    def send() -> None:
        t0 = time.monotonic()
        result["resp"] = request(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 2})
        result["s"] = time.monotonic() - t0

    worker = threading.Thread(target=send)
    worker.start()
    while worker.is_alive():
        assert request(port, "GET", "/health", timeout_s=10) == (200, {})
        time.sleep(0.01)
    worker.join()
    status, body = result["resp"]
    assert status == 400 and "--max-prompt-chars" in body["error"]["message"]
    assert result["s"] < 20  # liveness bound; it is refused before any tokenizing
    status, body = request(port, "POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "messages"
    completion_ok(port)


def test_prompt_plus_max_tokens_over_the_context_is_400(chat_server):
    status, body = request(chat_server.port, "POST", "/v1/completions", {"prompt": [1] * 500, "max_tokens": 100})
    assert status == 400
    assert body["error"]["message"].startswith("This model's maximum context length is 512 tokens. "
                                               "However, you requested 600 tokens (500 in the messages, "
                                               "100 in the completion).")
    status, body = request(chat_server.port, "POST", "/v1/completions", {"prompt": [1] * 512})
    assert status == 400 and "512 input tokens" in body["error"]["message"]
    status, body = request(chat_server.port, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10**12})
    assert status == 400 and "maximum context length" in body["error"]["message"]
    completion_ok(chat_server.port)


def test_concurrency_limit_429(strict_server):
    port = strict_server.port
    conns = []
    try:
        for i in range(STRICT.max_concurrent_requests):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/v1/completions", body=json.dumps({
                "prompt": [1, 2, 3 + i], "max_tokens": 400, "ignore_eos": True, "stream": True}),
                headers={"Content-Type": "application/json", **AUTH})
            resp = conn.getresponse()
            assert resp.status == 200
            resp.readline()
            conns.append((conn, resp))
        status, body = request(port, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 1}, headers=AUTH)
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
    finally:
        for conn, resp in conns:
            resp.close()
            conn.close()
    deadline = time.monotonic() + 30
    while True:
        status, _ = request(port, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 1}, headers=AUTH)
        if status == 200:
            break
        assert status == 429 and time.monotonic() < deadline
        time.sleep(0.1)


def test_malformed_http_is_answered_and_the_server_serves(chat_server):
    port = chat_server.port
    assert _raw(port, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
    huge_header = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2_000_000 + b"\r\n\r\n"
    assert _raw(port, huge_header)[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 431", b"")
    assert _post_raw(port, b"[1, 2]").split(b"\r\n", 1)[0] == b"HTTP/1.1 400 Bad Request"
    completion_ok(port)
