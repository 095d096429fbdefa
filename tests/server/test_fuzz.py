"""Random request bodies: every answer is a success or a 4xx with a message, never a 5xx, and
the server serves afterwards (what a client sends must not take the engine down)."""

from __future__ import annotations

import json
import random
from typing import Any

from tests.server.helpers import completion_ok, request

# Fields the server knows (sampling, output, chat, and some it refuses) plus a few it does not.
FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop",
          "stop_token_ids", "logprobs", "top_logprobs", "echo", "seed", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "stream",
          "stream_options", "logit_bias", "best_of", "suffix", "user", "skip_special_tokens",
          "include_stop_str_in_output", "prompt_logprobs", "truncate_prompt_tokens",
          "add_special_tokens", "max_completion_tokens", "messages", "response_format", "tools",
          "tool_choice", "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
          "use_beam_search", "allowed_token_ids", "no_such_field"]


def _value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value of a random type, biased to edges: huge, negative, NaN, lone surrogates."""
    kind = rng.randrange(13)
    if kind == 0:
        return rng.choice([0, 1, -1, 7, 2**31, 2**63, -2**63, 10**30])
    if kind == 1:
        return rng.choice([0.0, -0.5, 0.7, 2.5, 1e308, float("inf"), float("nan")])
    if kind == 2:
        return rng.choice(["", "a", "\ud800", "x" * 5000, "<|im_start|>", "\x00", "hello"])
    if kind == 3:
        return None
    if kind == 4:
        return rng.choice([True, False])
    if kind == 5 and depth < 2:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 6 and depth < 2:
        if rng.random() < 0.5:  # token-id keys, as logit_bias has them
            return {str(rng.choice([0, 5, 300, 49151, 49152, -1, 2**64])): _value(rng, 2)
                    for _ in range(rng.randrange(3))}
        return {str(_value(rng, 2)): _value(rng, depth + 1) for _ in range(rng.randrange(3))}
    if kind == 7:
        return [rng.randrange(-5, 60000) for _ in range(rng.randrange(6))]
    if kind == 8:
        return [[1, 2], [3]]
    if kind == 9:
        return [{"role": rng.choice(["user", "system", "assistant", "tool", "x"]),
                 "content": _value(rng, 2)}]
    if kind == 10:
        return {"include_usage": _value(rng, 2)}
    if kind == 11:
        return rng.randrange(30)
    return "Hi"


def test_random_bodies_get_an_answer_never_a_5xx(chat_server):
    rng = random.Random(20261207)
    bad, statuses = [], []
    for _ in range(400):
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        body: dict[str, Any] = {"model": "tiny-chat", "max_tokens": 3}
        if path == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": "hi"}]
        else:
            body["prompt"] = "hi"
        for field in rng.sample(FIELDS, rng.randrange(1, 5)):
            body[field] = _value(rng)
        raw = json.dumps(body).encode("utf-8", "surrogatepass")
        status, answer = request(chat_server.port, "POST", path, raw=raw)
        statuses.append(status)
        if status >= 500 or (status >= 400 and "message" not in str(answer)):
            bad.append((status, raw[:300], str(answer)[:300]))
    assert not bad, bad[:5]
    assert 200 in statuses  # the bodies are not all refused by one broken field
    completion_ok(chat_server.port)
