"""OpenAI-compatible HTTP server: real sockets, stdlib client, answers checked against ``LLM``.

Two servers run in-process on free ports, each on its own event loop in a background thread:
the tiny random qwen3 (token-id prompts, no tokenizer) and the embedded SmolLM2 (text, chat).
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from minivllm import LLM, AsyncLLM, SamplingParams
from tests.conftest import random_prompts
from tests.server.helpers import ServerThread, request, stream

SMOL_NAME = "smollm2-135m-instruct"
TINY_NAME = "tiny-qwen3"


class _ServerThread(ServerThread):
    """A server that owns its engine (shut down with it)."""

    def stop(self) -> None:
        super().stop()
        self.engine.shutdown()


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dirs):
    srv = _ServerThread(AsyncLLM(tiny_model_dirs["qwen3"], device="cpu"), TINY_NAME)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tiny_reference(tiny_model_dirs):
    return LLM(tiny_model_dirs["qwen3"], device="cpu")


@pytest.fixture(scope="module")
def smol_server(smollm_dir):
    srv = _ServerThread(AsyncLLM(smollm_dir, device="cpu", dtype="float32"), SMOL_NAME)
    yield srv
    srv.stop()


_request = request
_stream = stream


def test_health_and_models(tiny_server):
    assert _request(tiny_server.port, "GET", "/health") == (200, {})
    status, body = _request(tiny_server.port, "GET", "/v1/models")
    assert status == 200
    assert [m["id"] for m in body["data"]] == [TINY_NAME]


def test_token_id_completion_matches_offline(tiny_server, tiny_reference):
    prompt = random_prompts([13], seed=71)[0]
    status, body = _request(tiny_server.port, "POST", "/v1/completions", {
        "model": TINY_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert status == 200, body
    expected = tiny_reference.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                       use_tqdm=False)[0].outputs[0]
    choice = body["choices"][0]
    assert choice["token_ids"] == expected.token_ids
    assert choice["finish_reason"] == "length"
    assert body["object"] == "text_completion" and body["model"] == TINY_NAME
    assert body["usage"] == {"prompt_tokens": 13, "completion_tokens": 12, "total_tokens": 25}


def test_batched_prompts_non_streaming_and_streaming(tiny_server, tiny_reference):
    prompts = random_prompts([5, 30, 12], seed=72)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in tiny_reference.generate(prompts, params, use_tqdm=False)]
    body = {"model": TINY_NAME, "prompt": prompts, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    status, resp = _request(tiny_server.port, "POST", "/v1/completions", body)
    assert status == 200, resp
    assert [c["index"] for c in resp["choices"]] == [0, 1, 2]
    assert [c["token_ids"] for c in resp["choices"]] == expected
    assert resp["usage"]["prompt_tokens"] == 47 and resp["usage"]["completion_tokens"] == 30
    # Streaming interleaves the prompts; every choice index ends exactly once.
    events = _stream(tiny_server.port, "/v1/completions", {**body, "n": 2, "seed": 1, "temperature": 1.0})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    finished = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"])
    assert finished == [0, 1, 2, 3, 4, 5]
    # One bad prompt in a batch: 400, and the good ones do not linger in the engine.
    bad = {**body, "prompt": [prompts[0], [1] * 600]}
    status, resp = _request(tiny_server.port, "POST", "/v1/completions", bad)
    assert status == 400 and "maximum context length" in resp["error"]["message"]
    stats = tiny_server.call(tiny_server.engine.stats())
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


def test_text_completion_and_stream_match_offline(smol_server, smol_llm):
    prompt = "The three primary colors are"
    params = SamplingParams(temperature=0, max_tokens=20)
    expected = smol_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    req = {"prompt": prompt, "max_tokens": 20, "temperature": 0}
    status, body = _request(smol_server.port, "POST", "/v1/completions", req)
    assert status == 200, body
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["token_ids"] == expected.token_ids

    events = _stream(smol_server.port, "/v1/completions", req)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 2  # really streamed, not one blob
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reason
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_chat_and_chat_stream_match_offline(smol_server, smol_llm):
    messages = [{"role": "user", "content": "Name a fruit that is yellow."}]
    expected = smol_llm.chat(messages, SamplingParams(temperature=0, max_tokens=16),
                             use_tqdm=False)[0].outputs[0]
    req = {"model": SMOL_NAME, "messages": messages, "max_completion_tokens": 16, "temperature": 0}
    status, body = _request(smol_server.port, "POST", "/v1/chat/completions", req)
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)

    events = _stream(smol_server.port, "/v1/chat/completions", req)
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert deltas[0]["delta"]["role"] == "assistant"
    assert "".join(d["delta"].get("content", "") for d in deltas) == expected.text
    assert deltas[-1]["finish_reason"] == expected.finish_reason


def test_bad_requests_get_errors_while_a_good_one_succeeds(tiny_server, tiny_reference):
    port = tiny_server.port
    prompt = random_prompts([9], seed=72)[0]
    good_req = {"prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    good: dict = {}
    worker = threading.Thread(target=lambda: good.update(
        result=_request(port, "POST", "/v1/completions", good_req)))
    worker.start()

    too_long = [1] * (tiny_server.engine.max_model_len + 5)
    bad = [
        (raw, None, 400) for raw in (b"{not json", b"[1, 2]")
    ] + [
        (None, {"max_tokens": 4}, 400),                       # missing prompt
        (None, {"prompt": [1, 2], "temperature": -1}, 400),   # SamplingParams rejects it
        (None, {"prompt": [1, 2], "top_p": "high"}, 400),
        (None, {"prompt": ""}, 400),
        (None, {"prompt": []}, 400),
        (None, {"prompt": [1, "x"]}, 400),
        (None, {"prompt": too_long}, 400),                    # longer than max_model_len
        (None, {"prompt": [1, 2], "stream": "yes"}, 400),
        (None, {"prompt": [1, 2], "ignore_eos": "yes"}, 400),
        (None, {"prompt": "text needs a tokenizer"}, 400),    # the tiny model has none
        (None, {"prompt": [1, 2], "model": "gpt-4"}, 404),
    ]
    for raw, body, status in bad:
        got, err = _request(port, "POST", "/v1/completions", body, raw=raw)
        assert got == status, (body, raw, err)
        assert err["error"]["type"] in ("invalid_request_error", "NotFoundError")
        assert err["error"]["message"]
    for chat_body in ({"messages": []}, {"messages": [{"role": "user", "content": "hi"}]}):
        got, err = _request(port, "POST", "/v1/chat/completions", chat_body)  # no chat template
        assert got == 400, err
    assert _request(port, "GET", "/v1/nope")[0] == 404
    assert _request(port, "GET", "/v1/completions")[0] == 405

    worker.join(60)
    status, body = good["result"]
    assert status == 200, body
    expected = tiny_reference.generate([prompt], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
                                       use_tqdm=False)[0].outputs[0].token_ids
    assert body["choices"][0]["token_ids"] == expected
    assert _request(port, "GET", "/health") == (200, {})


def test_client_disconnect_mid_stream_aborts_the_request(smol_server):
    conn = http.client.HTTPConnection("127.0.0.1", smol_server.port, timeout=60)
    # Thousands of tokens on CPU take far longer than the wait below: only an abort ends it.
    conn.request("POST", "/v1/completions", body=json.dumps({
        "prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
        "stream": True}), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = 0
    while events < 3:
        if resp.readline().startswith(b"data: "):
            events += 1
    assert smol_server.call(smol_server.engine.stats())["num_running"] == 1
    resp.close()
    conn.close()

    deadline = time.monotonic() + 15
    while True:
        stats = smol_server.call(smol_server.engine.stats())
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            break
        assert time.monotonic() < deadline, f"request still running after disconnect: {stats}"
        time.sleep(0.1)
    assert _request(smol_server.port, "GET", "/health") == (200, {})


def test_health_is_503_when_the_engine_core_is_dead():
    from minivllm import EngineDeadError

    reason = ('engine core failed:\nTraceback (most recent call last):\n  File "/srv/minivllm/engine/core.py", '
              'line 1, in step\nRuntimeError: boom')

    class DeadEngine:  # only what /health and /v1/models touch
        max_model_len = 16
        tokenizer = None

        async def check_health(self) -> None:
            raise EngineDeadError(reason)

        def shutdown(self) -> None:
            pass

    srv = _ServerThread(DeadEngine(), "dead")  # type: ignore[arg-type]
    try:
        status, body = _request(srv.port, "GET", "/health")
        assert status == 503 and "engine core failed" in body["error"]["message"]
        assert "Traceback" not in json.dumps(body) and ".py" not in json.dumps(body)  # logged, not sent
        assert _request(srv.port, "GET", "/v1/models")[0] == 200
    finally:
        srv.stop()
