"""HTTP behaviour: keep-alive, chunked bodies, API key, CORS, content types, ops endpoints, metrics."""

from __future__ import annotations

import http.client
import json
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import CHAT_NAME
from tests.server.helpers import completion_ok, request, stream

AUTH = {"Authorization": "Bearer sekret"}


def test_keep_alive_two_requests_on_one_connection(chat_server):
    conn = http.client.HTTPConnection("127.0.0.1", chat_server.port, timeout=30)
    try:
        conn.request("GET", "/health")
        first = conn.getresponse()
        assert first.status == 200 and first.read() == b"{}"
        sock = conn.sock
        body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 3, "ignore_eos": True})
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        second = conn.getresponse()
        assert second.status == 200 and len(json.loads(second.read())["choices"][0]["token_ids"]) == 3
        assert conn.sock is sock  # same socket: the connection was kept alive
    finally:
        conn.close()


def test_chunked_request_body(chat_server):
    payload = json.dumps({"prompt": [5, 6, 7, 8], "max_tokens": 3, "ignore_eos": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", chat_server.port, timeout=30)
    try:
        conn.request("POST", "/v1/completions", body=iter([payload[:10], payload[10:]]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert len(json.loads(resp.read())["choices"][0]["token_ids"]) == 3
    finally:
        conn.close()


def test_api_key(strict_server):
    port = strict_server.port
    body = {"prompt": [1, 2], "max_tokens": 2}
    assert request(port, "POST", "/v1/completions", body)[0] == 401
    status, err = request(port, "POST", "/v1/completions", body, headers={"Authorization": "Bearer wrong"})
    assert status == 401 and err["error"]["type"] == "authentication_error"
    assert request(port, "GET", "/v1/models")[0] == 401
    assert request(port, "GET", "/metrics")[0] == 401
    assert request(port, "GET", "/health") == (200, {})  # open: supervisors have no key
    assert request(port, "GET", "/ping")[0] == 200
    assert request(port, "POST", "/v1/completions", body, headers=AUTH)[0] == 200


def test_cors(strict_server, chat_server):
    pre = {"Origin": "http://allowed.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    conn = http.client.HTTPConnection("127.0.0.1", strict_server.port, timeout=30)
    conn.request("OPTIONS", "/v1/completions", headers=pre)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    assert resp.getheader("access-control-allow-origin") == "http://allowed.example"
    conn.request("OPTIONS", "/v1/completions", headers={**pre, "Origin": "http://evil.example"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 400 and resp.getheader("access-control-allow-origin") is None
    conn.close()
    # CORS is off unless origins are given: no header, whatever the Origin.
    conn = http.client.HTTPConnection("127.0.0.1", chat_server.port, timeout=30)
    conn.request("GET", "/v1/models", headers={"Origin": "http://allowed.example"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200 and resp.getheader("access-control-allow-origin") is None
    conn.close()


def test_non_json_post_is_415_and_the_server_serves(chat_server):
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Origin": "http://evil.example"}
        if ctype:
            headers["Content-Type"] = ctype
        conn = http.client.HTTPConnection("127.0.0.1", chat_server.port, timeout=30)
        conn.putrequest("POST", "/v1/completions")
        data = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            conn.putheader(k, v)
        conn.endheaders(data)
        resp = conn.getresponse()
        assert resp.status == 415, ctype
        assert "application/json" in json.loads(resp.read())["error"]["message"]
        conn.close()
    status, _ = request(chat_server.port, "POST", "/v1/completions", raw=b'{"prompt": [1], "max_tokens": 1}',
                        headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200
    completion_ok(chat_server.port)


def test_body_limit_413(strict_server):
    big = json.dumps({"prompt": "x" * (300 * 1024)}).encode()
    status, body = request(strict_server.port, "POST", "/v1/completions", raw=big, headers=AUTH)
    assert status == 413, body
    conn = http.client.HTTPConnection("127.0.0.1", strict_server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                 headers={"Content-Type": "application/json", **AUTH}, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()
    assert request(strict_server.port, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 1},
                   headers=AUTH)[0] == 200


def test_ops_endpoints(chat_server, tiny_chat_llm):
    port = chat_server.port
    assert request(port, "GET", "/ping")[0] == 200
    status, body = request(port, "GET", "/version")
    assert status == 200 and body["version"]
    status, body = request(port, "GET", "/v1/models")
    assert [m["id"] for m in body["data"]] == [CHAT_NAME] and body["data"][0]["max_model_len"] == 512
    tok = tiny_chat_llm.get_tokenizer()
    status, body = request(port, "POST", "/tokenize", {"prompt": "Hello world", "return_token_strs": True})
    assert status == 200 and body["tokens"] == tok.encode("Hello world") and body["count"] == len(body["tokens"])
    assert len(body["token_strs"]) == body["count"]
    status, back = request(port, "POST", "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"] == tok.decode(body["tokens"])
    msgs = [{"role": "user", "content": "Hi"}]
    status, body = request(port, "POST", "/tokenize", {"messages": msgs})
    expected = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    assert status == 200 and body["tokens"] == expected
    assert request(port, "POST", "/detokenize", {"tokens": [10**9]})[0] == 400
    assert request(port, "POST", "/tokenize", {"prompt": "a", "messages": msgs})[0] == 400


def _metrics(port: int) -> dict[str, float]:
    status, text = request(port, "GET", "/metrics")
    assert status == 200
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" in s.labels:
                continue
            values[s.name + (f"{{{label}}}" if label else "")] = s.value
    return values


def test_metrics_move_by_the_right_amounts(chat_server):
    port = chat_server.port
    before = _metrics(port)
    for name in ("minivllm:num_requests_running", "minivllm:num_requests_waiting", "minivllm:kv_cache_usage_perc",
                 "minivllm:prefix_cache_queries_total", "minivllm:prefix_cache_hits_total",
                 "minivllm:num_preemptions_total", "minivllm:prompt_tokens_total",
                 "minivllm:generation_tokens_total", "minivllm:time_to_first_token_seconds_count",
                 "minivllm:inter_token_latency_seconds_count", "minivllm:e2e_request_latency_seconds_count"):
        assert name in before, name
    status, _ = request(port, "POST", "/v1/completions",
                        {"prompt": list(range(100, 107)), "max_tokens": 5, "ignore_eos": True, "n": 2})
    assert status == 200
    events = stream(port, "/v1/completions", {"prompt": [7, 8, 9], "max_tokens": 4, "ignore_eos": True})
    assert events[-1] == "[DONE]"
    after = _metrics(port)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("minivllm:prompt_tokens_total") == 7 + 3
    assert delta("minivllm:generation_tokens_total") == 2 * 5 + 4
    assert delta("minivllm:request_success_total{finished_reason=length}") == 3
    assert delta("minivllm:e2e_request_latency_seconds_count") == 2
    assert delta("minivllm:time_to_first_token_seconds_count") == 2
    assert delta("minivllm:inter_token_latency_seconds_count") == 4 + 3  # 5 tokens: 4 gaps; stream: 3
    assert delta("minivllm:prefix_cache_queries_total") >= 0
    assert after["minivllm:num_requests_running"] == 0


def test_64_streams_with_a_third_disconnecting(chat_server):
    port = chat_server.port
    before = _metrics(port)
    results: dict[int, object] = {}

    def client(i: int) -> None:
        leave = i % 3 == 0
        body = {"prompt": [1 + i, 2, 3], "max_tokens": 400 if leave else 16, "ignore_eos": True, "stream": True}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("POST", "/v1/completions", body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if leave:
                seen = 0
                while seen < 2:
                    if resp.readline().startswith(b"data: "):
                        seen += 1
                results[i] = "left"
                return
            events = [e for e in resp.read().decode().split("\n\n") if e]
            results[i] = events
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    num_left = len([i for i in range(64) if i % 3 == 0])
    for i in range(64):
        if i % 3 == 0:
            assert results[i] == "left"
        else:
            events = results[i]
            assert isinstance(events, list) and events[-1] == "data: [DONE]", (i, events)
            chunks = [json.loads(e[6:]) for e in events[:-1]]
            assert sum(len(c["choices"][0].get("token_ids") or []) for c in chunks) in (0, 16)
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    deadline = time.monotonic() + 30
    while True:
        stats = chat_server.stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            break
        assert time.monotonic() < deadline, f"disconnected streams still in the engine: {stats}"
        time.sleep(0.1)
    after = _metrics(port)
    aborted = after.get("minivllm:request_success_total{finished_reason=abort}", 0) - \
        before.get("minivllm:request_success_total{finished_reason=abort}", 0)
    finished = after.get("minivllm:request_success_total{finished_reason=length}", 0) - \
        before.get("minivllm:request_success_total{finished_reason=length}", 0)
    assert aborted == num_left and finished == 64 - num_left
    assert after["minivllm:num_requests_running"] == 0
    completion_ok(port)
