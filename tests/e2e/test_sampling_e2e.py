"""Sampling and stopping through the whole engine (tiny model for ids, SmolLM2 for text)."""

from __future__ import annotations

import pytest
import torch

from minivllm import LLM, SamplingParams
from tests.conftest import random_prompts


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dirs):
    return LLM(tiny_model_dirs["llama"], device="cpu")


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_seeded_sampling_is_independent_of_batch(tiny_llm):
    prompt = random_prompts([12], seed=11)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = _ids(tiny_llm.generate([prompt], seeded, use_tqdm=False))[0]
    others = random_prompts([5, 40, 17, 3], seed=12)
    mixed_params = [SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True)] * 2 + [seeded] + \
        [SamplingParams(temperature=1.2, seed=7, max_tokens=10, ignore_eos=True)] * 2
    batch = _ids(tiny_llm.generate(others[:2] + [prompt] + others[2:], mixed_params, use_tqdm=False))
    assert batch[2] == alone
    # A different seed gives a different sample (32k-ish possibilities per token: no accident).
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=4321, max_tokens=24, ignore_eos=True)
    assert _ids(tiny_llm.generate([prompt], other_seed, use_tqdm=False))[0] != alone


def test_top_k_1_equals_greedy(tiny_llm):
    prompts = random_prompts([9, 30], seed=13)
    greedy = _ids(tiny_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False))
    topk1 = _ids(tiny_llm.generate(prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=16),
                                   use_tqdm=False))
    assert topk1 == greedy


def test_stop_token_ids_and_min_tokens(tiny_llm):
    prompt = random_prompts([20], seed=14)[0]
    free = _ids(tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False))[0]
    stop_id = free[5]
    first = free.index(stop_id)
    out = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]),
                            use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # min_tokens bans the stop id until enough tokens exist, so generation goes on past it.
    out = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, min_tokens=first + 3,
                                                     stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= first + 3
    assert stop_id not in out.token_ids[:first + 2]


def test_eos_stops_unless_ignore_eos(tiny_model_dirs, tmp_path):
    import json
    import shutil

    prompt = random_prompts([20], seed=15)[0]
    free = _ids(LLM(tiny_model_dirs["llama"], device="cpu").generate(
        [prompt], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False))[0]
    eos = free[3]
    model_dir = tmp_path / "with-eos"
    shutil.copytree(tiny_model_dirs["llama"], model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (model_dir / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(model_dir), device="cpu")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free[:free.index(eos) + 1] and out.finish_reason == "stop"
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free and out.finish_reason == "length"


def test_n_greater_than_one(tiny_llm):
    prompt = random_prompts([10], seed=16)[0]
    out = tiny_llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12,
                                                     ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    again = tiny_llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12,
                                                       ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_logprobs_match_reference_log_softmax(tiny_llm, hf_tiny_models):
    prompt = random_prompts([14], seed=17)[0]
    out = tiny_llm.generate([prompt], SamplingParams(temperature=0.7, seed=3, max_tokens=6, logprobs=5,
                                                     ignore_eos=True), use_tqdm=False)[0].outputs[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        ref = hf_tiny_models["llama"](torch.tensor([ids])).logits[0].log_softmax(-1)
    total = 0.0
    for step, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + step]
        top = row.topk(5)
        assert set(top.indices.tolist()) <= set(lp)
        for t, v in lp.items():
            assert abs(v.logprob - row[t].item()) < 1e-4
            assert v.rank == 1 + int((row > row[t]).sum())  # 1-based rank in the vocabulary
        total += row[tok].item()
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_stop_strings_on_embedded_model(smol_llm):
    msgs = [{"role": "user", "content": "Count from one to ten in words, separated by commas."}]
    free = smol_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    text = free.text
    assert len(text) > 20
    stop = text[10:14]
    cut = text.index(stop)
    out = smol_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=40, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    out = smol_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=40, stop=stop,
                                             include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert out.text == text[:cut + len(stop)]


def test_penalties_discourage_repeats_through_the_engine(tiny_llm):
    prompts = random_prompts([6, 11, 20], seed=18)
    plain = _ids(tiny_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                                   use_tqdm=False))
    penalised = _ids(tiny_llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, presence_penalty=2.0,
                                frequency_penalty=2.0, repetition_penalty=2.0), use_tqdm=False))
    assert penalised != plain
    # Greedy on a tiny random model loops; penalties must break that.
    assert sum(len(set(p)) for p in penalised) > sum(len(set(p)) for p in plain)
