"""``SamplingParams(prompt_logprobs=N)``: every prompt token's logprob (and rank) plus the top-N,
equal to HF transformers' float32 log-softmax of the prompt, whatever the chunking, the prefix
cache or the other requests in the batch; offline, through AsyncLLM and over HTTP."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from minivllm import LLM, AsyncLLM, SamplingParams
from minivllm.outputs import Logprob
from tests.conftest import random_prompts

ATOL = 1e-4
MODEL = "llama"


def hf_prompt_logprobs(hf_model, prompt: list[int]) -> torch.Tensor:
    """HF's float32 log-softmax at every prompt position: row p predicts prompt token p + 1."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt])).logits[0].float()
    return logits.log_softmax(dim=-1)


def check_against_hf(prompt_logprobs, prompt: list[int], num_top: int, ref: torch.Tensor) -> None:
    """The vLLM shape and the values: None first, then the prompt token (its vocabulary rank)
    and the top-N, each as HF computes them."""
    assert prompt_logprobs is not None and len(prompt_logprobs) == len(prompt)
    assert prompt_logprobs[0] is None
    for p in range(len(prompt) - 1):
        entry, row, token = prompt_logprobs[p + 1], ref[p], prompt[p + 1]
        assert all(isinstance(lp, Logprob) for lp in entry.values())
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=ATOL)
        assert entry[token].rank == int((row >= row[token] - 1e-6).sum())  # tokens at least as likely
        top_lp, top_ids = row.topk(num_top)
        others = set(entry) - set(top_ids.tolist())
        assert others <= {token} and len(entry) == num_top + len(others)
        for rank, (tid, lp) in enumerate(zip(top_ids.tolist(), top_lp.tolist()), start=1):
            assert entry[tid].logprob == pytest.approx(lp, abs=ATOL)
            assert entry[tid].rank == (entry[token].rank if tid == token else rank)


@pytest.fixture(scope="module")
def hf_model(hf_tiny_models):
    return hf_tiny_models[MODEL]


@pytest.fixture(scope="module")
def chunked_llm(tiny_model_dirs):
    """Prompts of up to 80 tokens take several 32-token steps; prefix caching on (the default);
    overlapped scheduling (CUDA's default): the host learns each step's results a step late."""
    return LLM(tiny_model_dirs[MODEL], device="cpu", max_num_batched_tokens=32, num_kv_blocks=64,
               async_scheduling=True)


def test_one_chunk_matches_hf(tiny_model_dirs, hf_model):
    llm = LLM(tiny_model_dirs[MODEL], device="cpu", num_kv_blocks=32)
    prompt = random_prompts([23], seed=71)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3),
                       use_tqdm=False)[0]
    check_against_hf(out.prompt_logprobs, prompt, 3, hf_prompt_logprobs(hf_model, prompt))
    # Only the prompt token itself with N = 0; a one-token prompt has nothing to score.
    out0, single = llm.generate([prompt, prompt[:1]], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                use_tqdm=False)
    check_against_hf(out0.prompt_logprobs, prompt, 0, hf_prompt_logprobs(hf_model, prompt))
    assert single.prompt_logprobs == [None]


def test_chunked_prefill_prefix_cache_and_mixed_batch(chunked_llm, hf_model):
    long_prompt, other, plain = random_prompts([80, 45, 30], seed=72)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with_plp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=5)
    alone = chunked_llm.generate([plain, long_prompt], greedy, use_tqdm=False)

    # Same prefix as the long prompt (now in the prefix cache): still scored from position 0.
    shared = long_prompt[:64] + other[:10]
    outs = chunked_llm.generate([plain, long_prompt, other, shared],
                                [greedy, with_plp, with_plp, with_plp], use_tqdm=False)
    for prompt, out in zip([long_prompt, other, shared], outs[1:]):
        check_against_hf(out.prompt_logprobs, prompt, 5, hf_prompt_logprobs(hf_model, prompt))
    assert outs[0].prompt_logprobs is None
    # Asking changes nothing else: the same greedy tokens as without it.
    assert outs[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert outs[1].outputs[0].token_ids == alone[1].outputs[0].token_ids
    assert outs[3].num_cached_tokens == 0  # prompt logprobs skip the prefix cache lookup ...
    again = chunked_llm.generate([shared], greedy, use_tqdm=False)[0]
    assert again.num_cached_tokens >= 64  # ... and the blocks they computed are cached for others


def test_preempted_requests_score_each_prompt_token_once(tiny_model_dirs, hf_model):
    # 3 x (40 + 40) tokens in a 160-token cache: requests are preempted and recomputed.
    llm = LLM(tiny_model_dirs[MODEL], device="cpu", max_num_batched_tokens=32, num_kv_blocks=10)
    prompts = random_prompts([40, 40, 40], seed=75)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                prompt_logprobs=1), use_tqdm=False)
    assert llm.stats()["num_preemptions"] > 0
    for prompt, out in zip(prompts, outs):
        check_against_hf(out.prompt_logprobs, prompt, 1, hf_prompt_logprobs(hf_model, prompt))


def test_n_above_one_and_bad_values(chunked_llm, hf_model):
    prompt = random_prompts([40], seed=73)[0]
    out = chunked_llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=3,
                                                        prompt_logprobs=2), use_tqdm=False)[0]
    assert len(out.outputs) == 3
    check_against_hf(out.prompt_logprobs, prompt, 2, hf_prompt_logprobs(hf_model, prompt))
    for bad in (-1, 21, 2.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


@pytest.fixture(scope="module")
def async_engine(tiny_model_dirs):
    """An engine core in its own process: prompt logprobs cross the ZMQ boundary."""
    engine = AsyncLLM(tiny_model_dirs[MODEL], device="cpu", max_num_batched_tokens=16, num_kv_blocks=32)
    yield engine
    engine.shutdown()


def test_async_llm_streams_them_once(async_engine, hf_model):
    prompt = random_prompts([50], seed=74)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2)

    async def run():
        return [o async for o in async_engine.generate(prompt, params, "plp", output_kind="delta")]

    outs = asyncio.run(run())
    check_against_hf(outs[0].prompt_logprobs, prompt, 2, hf_prompt_logprobs(hf_model, prompt))
    assert all(o.prompt_logprobs is None for o in outs[1:])  # deltas carry them once


def _from_json(prompt_logprobs: list) -> list:
    """The server's ``prompt_logprobs`` back into Python-API objects (JSON keys are strings)."""
    return [None if e is None else {int(t): Logprob(v["logprob"], v["rank"], v["decoded_token"])
                                    for t, v in e.items()} for e in prompt_logprobs]


def test_openai_server_prompt_logprobs_and_echo_with_logprobs(async_engine, hf_model):
    from tests.server.helpers import ServerThread, request, stream

    prompt = random_prompts([30], seed=76)[0]
    ref = hf_prompt_logprobs(hf_model, prompt)
    server = ServerThread(async_engine, "tiny")
    try:
        body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        status, resp = request(server.port, "POST", "/v1/completions", {**body, "prompt_logprobs": 2})
        assert status == 200, resp
        choice = resp["choices"][0]
        check_against_hf(_from_json(choice["prompt_logprobs"]), prompt, 2, ref)
        assert choice["logprobs"] is None  # prompt logprobs are not completion logprobs

        # Streaming: the first chunk of the choice carries the same prompt logprobs.
        events = [json.loads(e) for e in stream(server.port, "/v1/completions", {**body, "prompt_logprobs": 2})
                  if e != "[DONE]"]
        assert events[0]["choices"][0]["prompt_logprobs"] == choice["prompt_logprobs"]
        assert all("prompt_logprobs" not in e["choices"][0] for e in events[1:])

        # echo + logprobs: the prompt tokens lead the logprobs, the first one without a logprob.
        status, resp = request(server.port, "POST", "/v1/completions", {**body, "echo": True, "logprobs": 1})
        assert status == 200, resp
        lps = resp["choices"][0]["logprobs"]
        assert len(lps["tokens"]) == len(prompt) + 3
        assert lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
        for p in range(len(prompt) - 1):
            assert lps["token_logprobs"][p + 1] == pytest.approx(ref[p, prompt[p + 1]].item(), abs=ATOL)
            assert len(lps["top_logprobs"][p + 1]) in (1, 2)  # the top-1 and the prompt token
            assert max(lps["top_logprobs"][p + 1].values()) == pytest.approx(ref[p].max().item(), abs=ATOL)
        # Streamed, the echo chunk holds the prompt's part of them.
        events = [json.loads(e) for e in stream(server.port, "/v1/completions", {**body, "echo": True, "logprobs": 1})
                  if e != "[DONE]"]
        echoed = events[0]["choices"][0]["logprobs"]
        assert echoed["token_logprobs"] == lps["token_logprobs"][:len(prompt)]
        assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events[1:]) == 3

        status, resp = request(server.port, "POST", "/v1/completions", {**body, "prompt_logprobs": 21})
        assert status == 400 and resp["error"]["param"] == "prompt_logprobs"
    finally:
        server.stop()
