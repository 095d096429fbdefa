"""Every request field is honoured (same result as the Python API) or refused with 400 naming it,
through the official ``openai`` client."""

from __future__ import annotations

import pytest

from minivllm import SamplingParams
from tests.server.conftest import CHAT_NAME
from tests.server.helpers import completion_ok, request

openai = pytest.importorskip("openai")

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{chat_server.port}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def _offline(llm, prompt, **kw) -> list:
    return llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0].outputs


def _greedy_ids(llm, prompt, n_tokens: int) -> list[int]:
    return _offline(llm, prompt, temperature=0, max_tokens=n_tokens, ignore_eos=True)[0].token_ids


HONOURED = [
    {"temperature": 0, "max_tokens": 8, "ignore_eos": True},
    {"temperature": 0, "max_tokens": 8, "min_tokens": 8},
    {"temperature": 0, "max_tokens": 8, "ignore_eos": True, "repetition_penalty": 1.3},
    {"temperature": 0, "max_tokens": 8, "ignore_eos": True, "presence_penalty": 1.0, "frequency_penalty": 0.5},
    {"temperature": 1.0, "max_tokens": 8, "ignore_eos": True, "top_k": 5, "seed": 7},
    {"temperature": 1.0, "max_tokens": 8, "ignore_eos": True, "min_p": 0.2, "seed": 3},
    {"temperature": 0.8, "max_tokens": 8, "ignore_eos": True, "top_p": 0.5, "seed": 11, "n": 3},
    {"temperature": 0, "max_tokens": 8, "ignore_eos": True, "skip_special_tokens": False},
    {"temperature": 0, "max_tokens": 6, "ignore_eos": True, "logprobs": 3},
    # Int keys here; the client sends them as JSON object keys ("300"), as OpenAI's logit_bias.
    {"temperature": 0, "max_tokens": 6, "ignore_eos": True, "logit_bias": {300: 100, 301: -100.0}, "logprobs": 2},
    {"temperature": 1.0, "max_tokens": 8, "ignore_eos": True, "allowed_token_ids": [300, 301, 302], "seed": 5},
    {"temperature": 0.7, "max_tokens": 8, "ignore_eos": True, "seed": 2, "n": 2, "logit_bias": {42: 5},
     "allowed_token_ids": [40, 41, 42, 43]},
]
_STANDARD = {"temperature", "max_tokens", "top_p", "seed", "n", "presence_penalty", "frequency_penalty",
             "logprobs"}


@pytest.mark.parametrize("kw", HONOURED, ids=lambda kw: ",".join(sorted(kw)))
def test_completion_fields_match_offline(client, tiny_chat_llm, kw):
    expected = _offline(tiny_chat_llm, PROMPT, **kw)
    resp = client.completions.create(model=CHAT_NAME, prompt=PROMPT,
                                     extra_body={k: v for k, v in kw.items() if k not in _STANDARD},
                                     **{k: v for k, v in kw.items() if k in _STANDARD})
    assert [c.text for c in resp.choices] == [e.text for e in expected]
    assert [c.model_extra["token_ids"] for c in resp.choices] == [e.token_ids for e in expected]
    if "logprobs" in kw:
        lp = resp.choices[0].logprobs
        for tid, got, step in zip(expected[0].token_ids, lp.token_logprobs, expected[0].logprobs):
            want = step[tid]
            assert got == pytest.approx(float(getattr(want, "logprob", want)), abs=1e-5)
        assert all(len(t) >= 3 for t in lp.top_logprobs)


def test_stop_token_ids_and_stop_strings(client, tiny_chat_llm):
    ids = _greedy_ids(tiny_chat_llm, PROMPT, 8)
    resp = client.completions.create(model=CHAT_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={"stop_token_ids": [ids[3]], "ignore_eos": True})
    c = resp.choices[0]
    assert c.model_extra["token_ids"] == ids[:4] and c.finish_reason == "stop"
    assert c.model_extra["stop_reason"] == ids[3]
    full = _offline(tiny_chat_llm, PROMPT, temperature=0, max_tokens=8, ignore_eos=True)[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    for include in (False, True):
        expected = _offline(tiny_chat_llm, PROMPT, temperature=0, max_tokens=8, ignore_eos=True, stop=[stop],
                            include_stop_str_in_output=include)[0]
        resp = client.completions.create(model=CHAT_NAME, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop],
                                         extra_body={"include_stop_str_in_output": include, "ignore_eos": True})
        assert resp.choices[0].text == expected.text and resp.choices[0].finish_reason == "stop"


def test_echo_and_batch(client, tiny_chat_llm):
    expected = _offline(tiny_chat_llm, PROMPT, temperature=0, max_tokens=5, ignore_eos=True)[0].text
    resp = client.completions.create(model=CHAT_NAME, prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                                     extra_body={"ignore_eos": True})
    assert resp.choices[0].text == PROMPT + expected
    resp = client.completions.create(model=CHAT_NAME, prompt=[PROMPT, "Hi"], max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1] and resp.choices[0].text == expected


def test_truncate_and_add_special_tokens(chat_server, tiny_chat_llm):
    tok = tiny_chat_llm.get_tokenizer()
    ids = tok.encode(PROMPT)
    status, body = request(chat_server.port, "POST", "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "truncate_prompt_tokens": 3})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == 3
    assert body["choices"][0]["token_ids"] == _greedy_ids(tiny_chat_llm, ids[-3:], 4)


def _render(tok, messages, **kw) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, **kw)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_template_fields(client, tiny_chat_llm):
    tok = tiny_chat_llm.get_tokenizer()
    msgs = [{"role": "user", "content": "Name a colour."}]
    cases = [
        ({}, {"add_generation_prompt": True}),
        ({"add_generation_prompt": False}, {"add_generation_prompt": False}),
        ({"chat_template_kwargs": {"unused_flag": True}}, {"add_generation_prompt": True}),
    ]
    for extra, render_kw in cases:
        expected = _greedy_ids(tiny_chat_llm, _render(tok, msgs, **render_kw), 6)
        resp = client.chat.completions.create(model=CHAT_NAME, messages=msgs, max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True, **extra})
        assert resp.choices[0].message.content == tok.decode(expected), extra
    cont = msgs + [{"role": "assistant", "content": "Blue is"}]
    expected = _greedy_ids(tiny_chat_llm, _render(tok, cont, continue_final_message=True), 6)
    resp = client.chat.completions.create(model=CHAT_NAME, messages=cont, max_tokens=6, temperature=0, extra_body={
        "ignore_eos": True, "continue_final_message": True, "add_generation_prompt": False})
    assert resp.choices[0].message.content == tok.decode(expected)


def test_chat_logprobs_include_sampled_token_and_bytes(client, tiny_chat_llm):
    tok = tiny_chat_llm.get_tokenizer()
    msgs = [{"role": "user", "content": "Hi"}]
    ids = _render(tok, msgs, add_generation_prompt=True)
    expected = _offline(tiny_chat_llm, ids, temperature=0, max_tokens=5, ignore_eos=True, logprobs=3)[0]
    resp = client.chat.completions.create(model=CHAT_NAME, messages=msgs, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    for entry, tid, step in zip(content, expected.token_ids, expected.logprobs):
        assert entry.token == tok.decode([tid])
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(float(getattr(step[tid], "logprob", step[tid])), abs=1e-5)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled token ranks first
        assert all(t.bytes is not None for t in entry.top_logprobs)


def test_stream_include_usage(client):
    chunks = list(client.chat.completions.create(
        model=CHAT_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].choices == []


REFUSED = [
    ("completions", {"suffix": "the end"}, "suffix"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"guided_json": {"type": "object"}}, "guided_json"),
    ("completions", {"use_beam_search": True}, "use_beam_search"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
    ("chat", {"echo": True}, "echo"),
    ("chat", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("chat", {"chat_template": "{{ messages }}"}, "chat_template"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
]


@pytest.mark.parametrize("endpoint,extra,field", REFUSED, ids=lambda x: x if isinstance(x, str) else None)
def test_unsupported_fields_are_refused_naming_the_field(client, chat_server, endpoint, extra, field):
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "completions":
            client.completions.create(model=CHAT_NAME, prompt="Hi", max_tokens=2, extra_body=extra)
        else:
            client.chat.completions.create(model=CHAT_NAME, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=2, extra_body=extra)
    assert info.value.status_code == 400
    assert field in info.value.message
    assert info.value.body["param"] == field


def test_inert_values_of_refused_fields_are_accepted(chat_server):
    status, body = request(chat_server.port, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "response_format": {"type": "text"},
        "tools": [], "tool_choice": "none", "logit_bias": {}, "best_of": 1, "user": "u1", "store": False})
    assert status == 200, body


def test_chat_logit_bias_and_allowed_token_ids(client, tiny_chat_llm):
    tok = tiny_chat_llm.get_tokenizer()
    msgs = [{"role": "user", "content": "Hi"}]
    ids = _render(tok, msgs, add_generation_prompt=True)
    kw = {"temperature": 0.9, "seed": 4, "max_tokens": 6, "ignore_eos": True}
    expected = _offline(tiny_chat_llm, ids, logit_bias={300: 100}, **kw)[0]
    assert expected.token_ids == [300] * 6
    resp = client.chat.completions.create(model=CHAT_NAME, messages=msgs, max_tokens=6, temperature=0.9, seed=4,
                                          logit_bias={"300": 100}, extra_body={"ignore_eos": True})
    assert resp.choices[0].message.content == expected.text
    expected = _offline(tiny_chat_llm, ids, allowed_token_ids=[300, 301], **kw)[0]
    resp = client.chat.completions.create(model=CHAT_NAME, messages=msgs, max_tokens=6, temperature=0.9, seed=4,
                                          extra_body={"ignore_eos": True, "allowed_token_ids": [300, 301]})
    assert resp.choices[0].message.content == expected.text


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("field,value,message", [
    ("logit_bias", {"abc": 1}, "token ids"),
    ("logit_bias", {"-5": 1}, "token ids"),
    ("logit_bias", {" 5": 1}, "token ids"),
    ("logit_bias", {"5": 1, "05": 2}, "more than once"),
    ("logit_bias", {"99999999999999999999999": 1}, "token ids"),
    ("logit_bias", {"5": 101}, "-100, 100"),
    ("logit_bias", {"5": -1e300}, "-100, 100"),
    ("logit_bias", {"5": "1"}, "number"),
    ("logit_bias", {"5": True}, "number"),
    ("logit_bias", {"5": None}, "number"),
    ("logit_bias", [5, 1], "object"),
    ("logit_bias", {"49152": 1}, "out of vocabulary"),
    ("allowed_token_ids", [], "empty"),
    ("allowed_token_ids", [-1], "allowed_token_ids"),
    ("allowed_token_ids", [1, 49152], "out of vocabulary"),
    ("allowed_token_ids", [1.5], "allowed_token_ids"),
    ("allowed_token_ids", [2**63], "allowed_token_ids"),
    ("allowed_token_ids", {"1": 1}, "array"),
])
def test_bad_logit_bias_and_allowed_token_ids_are_400_and_the_server_serves(chat_server, endpoint, field, value,
                                                                           message):
    body = {"max_tokens": 2, field: value}
    body.update({"prompt": "Hi"} if endpoint == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]})
    status, answer = request(chat_server.port, "POST", endpoint, body)
    assert status == 400, answer
    assert answer["error"]["param"] == field
    assert message in answer["error"]["message"]
    completion_ok(chat_server.port)


def test_allowed_token_ids_that_min_tokens_bans_are_400(chat_server):
    # EOS (2) is the only allowed token, but min_tokens bans it at first: nothing to sample.
    status, answer = request(chat_server.port, "POST", "/v1/completions", {
        "prompt": "Hi", "max_tokens": 4, "min_tokens": 2, "allowed_token_ids": [2]})
    assert status == 400 and "min_tokens" in answer["error"]["message"], answer
    status, answer = request(chat_server.port, "POST", "/v1/completions", {
        "prompt": "Hi", "max_tokens": 4, "min_tokens": 2, "allowed_token_ids": [2], "ignore_eos": True})
    assert status == 200 and answer["choices"][0]["token_ids"] == [2] * 4, answer


def test_unknown_model_and_known_fields_with_bad_types(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=CHAT_NAME, prompt="Hi", max_tokens=2, extra_body={"top_k": "many"})
    assert info.value.body["param"] == "top_k"


@pytest.mark.parametrize("field,value", [("top_k", 2**63), ("seed", 2**63), ("stop_token_ids", [2**63]),
                                         ("max_tokens", 2**63), ("min_tokens", 2**64), ("n", 2**63),
                                         ("stop_token_ids", [49152]), ("seed", -(2**63) - 1)])
def test_integers_beyond_their_range_are_400_and_the_server_serves(chat_server, field, value):
    status, body = request(chat_server.port, "POST", "/v1/completions",
                           {"prompt": "Hi", "max_tokens": 4, "temperature": 1.0, field: value})
    assert status == 400, body
    assert body["error"]["param"] == field
    completion_ok(chat_server.port)
