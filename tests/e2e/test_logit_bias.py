"""``logit_bias`` and ``allowed_token_ids`` through the whole engine (tiny random llama): what
a user sees, with overlapped scheduling on and off, and bad values refused without harm."""

from __future__ import annotations

import pytest

from minivllm import LLM, SamplingParams
from tests.conftest import TINY_VOCAB, random_prompts


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dirs):
    return LLM(tiny_model_dirs["llama"], device="cpu")


def _outs(llm, prompts, params):
    return [o.outputs for o in llm.generate(prompts, params, use_tqdm=False)]


def test_greedy_with_a_large_bias_yields_that_token_and_raw_logprobs(tiny_llm):
    prompt = random_prompts([12], seed=31)[0]
    free = _outs(tiny_llm, [prompt], SamplingParams(temperature=0, max_tokens=6, logprobs=3,
                                                    ignore_eos=True))[0][0]
    token = next(t for t in range(TINY_VOCAB) if t not in free.token_ids)
    biased = _outs(tiny_llm, [prompt], SamplingParams(temperature=0, max_tokens=6, logprobs=3,
                                                      logit_bias={token: 100}, ignore_eos=True))[0][0]
    assert biased.token_ids == [token] * 6
    # Logprobs are those of the raw model: the first step's top-3 are the unbiased run's, and
    # every step's sampled-token logprob is what the model gives that token after that prefix.
    assert {t: lp.logprob for t, lp in biased.logprobs[0].items() if t != token} == \
        {t: lp.logprob for t, lp in free.logprobs[0].items()}
    check = tiny_llm.generate([prompt + biased.token_ids], SamplingParams(max_tokens=1, prompt_logprobs=0),
                              use_tqdm=False)[0].prompt_logprobs
    for step, lps in enumerate(biased.logprobs):
        raw = check[len(prompt) + step][token]
        assert lps[token].logprob == pytest.approx(raw.logprob, abs=1e-4)
        assert lps[token].rank == raw.rank
    # A -100 bias on the greedy choice moves greedy off it, every step.
    banned = _outs(tiny_llm, [prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                      logit_bias={free.token_ids[0]: -100}))[0][0]
    assert banned.token_ids[0] != free.token_ids[0]


@pytest.mark.parametrize("kw", [{"temperature": 0}, {"temperature": 1.3, "seed": 5, "n": 3},
                                {"temperature": 1.0, "top_p": 0.9, "top_k": 2}])
def test_allowed_token_ids_are_the_only_output(tiny_llm, kw):
    allowed = [7, 300]
    prompts = random_prompts([5, 20], seed=32)
    outs = _outs(tiny_llm, prompts, SamplingParams(max_tokens=12, ignore_eos=True, allowed_token_ids=allowed,
                                                   **kw))
    tokens = [t for o in outs for c in o for t in c.token_ids]
    assert len(tokens) == 12 * len(prompts) * kw.get("n", 1)
    assert set(tokens) <= set(allowed)
    if kw["temperature"] > 1:
        assert set(tokens) == set(allowed)  # real draws, not one token forced
        again = _outs(tiny_llm, prompts, SamplingParams(max_tokens=12, ignore_eos=True,
                                                        allowed_token_ids=allowed, **kw))
        assert [[c.token_ids for c in o] for o in again] == [[c.token_ids for c in o] for o in outs]


MIX = [
    SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logit_bias={11: 100, 12: -50}),
    SamplingParams(temperature=0.9, seed=3, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=4, max_tokens=16, ignore_eos=True, allowed_token_ids=[1, 2, 3, 4]),
    SamplingParams(temperature=0, max_tokens=9, min_tokens=4, stop_token_ids=[50], allowed_token_ids=[50, 51],
                   logit_bias={50: 30}),
    SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.4, logprobs=2),
]


def test_unbiased_rows_are_untouched_by_biased_ones(tiny_llm):
    prompts = random_prompts([9, 30, 4, 17, 25, 6], seed=33)
    plain = [0, 2, 5]
    alone = _outs(tiny_llm, [prompts[i] for i in plain], [MIX[i] for i in plain])
    mixed = _outs(tiny_llm, prompts, MIX)
    for got, want in zip([mixed[i] for i in plain], alone):
        assert got[0].token_ids == want[0].token_ids
        for g, w in zip(got[0].logprobs or [], want[0].logprobs or []):  # up to the batch's float sums
            assert g.keys() == w.keys()
            assert all(g[t].logprob == pytest.approx(w[t].logprob, abs=1e-5) for t in g)
    assert set(mixed[1][0].token_ids) == {11}
    assert set(mixed[3][0].token_ids) <= {1, 2, 3, 4}
    # min_tokens bans the stop id 50 (which the bias favours) for 4 tokens, then it stops.
    assert mixed[4][0].token_ids == [51] * 4 + [50] and mixed[4][0].finish_reason == "stop"


def test_overlapped_scheduling_gives_the_same_tokens(tiny_model_dirs, tiny_llm):
    prompts = random_prompts([9, 30, 4, 17, 25, 6], seed=34)
    want = _outs(tiny_llm, prompts, MIX)
    llm = LLM(tiny_model_dirs["llama"], device="cpu", async_scheduling=True)
    got = _outs(llm, prompts, MIX)
    assert [[(c.token_ids, c.logprobs, c.finish_reason) for c in o] for o in got] == \
        [[(c.token_ids, c.logprobs, c.finish_reason) for c in o] for o in want]


@pytest.mark.parametrize("kw,message", [
    ({"logit_bias": {TINY_VOCAB: 5}}, "logit_bias: token id 512 is out of vocabulary"),
    ({"allowed_token_ids": [3, TINY_VOCAB + 7]}, "allowed_token_ids: token id 519"),
    ({"allowed_token_ids": [9], "stop_token_ids": [9], "min_tokens": 2}, "nothing could be sampled"),
])
def test_bad_token_ids_raise_and_the_engine_goes_on(tiny_llm, kw, message):
    prompts = random_prompts([6, 8], seed=35)
    good = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    expected = _outs(tiny_llm, prompts[:1], good)[0][0].token_ids
    with pytest.raises(ValueError, match=message):
        tiny_llm.generate(prompts, [good, SamplingParams(max_tokens=4, **kw)], use_tqdm=False)
    assert tiny_llm.stats()["num_running"] == 0 and tiny_llm.stats()["num_waiting"] == 0
    assert _outs(tiny_llm, prompts[:1], good)[0][0].token_ids == expected
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 250})
