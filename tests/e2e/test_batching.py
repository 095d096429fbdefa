"""Batch invariance, prefix caching, preemption and chunked prefill leave greedy outputs unchanged."""

from __future__ import annotations

from minivllm import LLM, SamplingParams
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
MIXED_LENGTHS = [3, 70, 16, 1, 33, 48, 5, 90, 17, 64, 12, 31, 2, 80, 40, 9]


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_alone_vs_in_mixed_batch_of_16(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", enable_prefix_caching=False)
    prompts = random_prompts(MIXED_LENGTHS, seed=1)
    batch = _ids(llm.generate(prompts, GREEDY, use_tqdm=False))
    for i in (0, 1, 7, 13):
        alone = _ids(llm.generate([prompts[i]], GREEDY, use_tqdm=False))[0]
        assert alone == batch[i], f"prompt {i} (length {len(prompts[i])}) changed inside the batch"


def test_prefix_cache_hit_equals_miss(tiny_model_dirs):
    shared = random_prompts([50], seed=2)[0]
    prompts = [shared + tail for tail in random_prompts([3, 20, 1], seed=3)]
    cold = LLM(tiny_model_dirs["qwen3"], device="cpu", enable_prefix_caching=False)
    expected = _ids(cold.generate(prompts, GREEDY, use_tqdm=False))

    warm = LLM(tiny_model_dirs["qwen3"], device="cpu", enable_prefix_caching=True)
    warm.generate([shared + [1, 2]], GREEDY, use_tqdm=False)  # fills the cache with the prefix
    hits_before = warm.stats()["prefix_cache_hits"]
    outs = warm.generate(prompts, GREEDY, use_tqdm=False)
    assert _ids(outs) == expected
    assert warm.stats()["prefix_cache_hits"] - hits_before >= 3 * 48  # three full blocks each
    assert all(o.num_cached_tokens == 48 for o in outs)
    # The exact same prompt again: all but the last block comes from the cache.
    again = warm.generate(prompts[:1], GREEDY, use_tqdm=False)
    assert _ids(again) == expected[:1]


def test_preemption_when_cache_is_too_small(tiny_model_dirs):
    prompts = random_prompts([40, 35, 50, 20, 45, 30, 38, 25], seed=4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    roomy = LLM(tiny_model_dirs["qwen2"], device="cpu")
    expected = _ids(roomy.generate(prompts, params, use_tqdm=False))
    # 8 requests × ~80 tokens need ~40 blocks of 16; give the cache 14.
    tight = LLM(tiny_model_dirs["qwen2"], device="cpu", num_kv_blocks=14)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert _ids(outs) == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert tight.stats()["num_preemptions"] > 0


def test_chunked_prefill_budget_smaller_than_prompts(tiny_model_dirs):
    prompts = random_prompts([100, 57, 33, 8], seed=5)
    full = LLM(tiny_model_dirs["llama"], device="cpu")
    expected = _ids(full.generate(prompts, GREEDY, use_tqdm=False))
    chunked = LLM(tiny_model_dirs["llama"], device="cpu", max_num_batched_tokens=24)
    assert _ids(chunked.generate(prompts, GREEDY, use_tqdm=False)) == expected


def test_generation_stops_at_max_model_len(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", max_model_len=40)
    out = llm.generate([random_prompts([30], seed=6)[0]], SamplingParams(temperature=0, max_tokens=100),
                       use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 40
