"""Overlapped ("async") scheduling changes when the host learns tokens, never which tokens.

The same engine code runs on CPU with ``async_scheduling=True``: every test here compares it
with ``async_scheduling=False`` token for token, with the features that interact with a token
arriving one step late in the mix (stop ids, stop strings, min_tokens, max_tokens,
preemption, prefix caching, chunked prefill, n > 1, penalties, seeds, logprobs, abort).
"""

from __future__ import annotations

import pytest

from minivllm import LLM, SamplingParams
from minivllm.engine.input_processor import child_request_id
from tests.conftest import random_prompts

MIXED = [3, 70, 16, 1, 33, 48, 5, 90, 17, 12]


def _run(model_dir: str, prompts, params, **kwargs):
    outs = {}
    for overlap in (False, True):
        llm = LLM(model_dir, device="cpu", async_scheduling=overlap, **kwargs)
        res = llm.generate(prompts, params, use_tqdm=False)
        outs[overlap] = [[(c.token_ids, c.finish_reason, c.stop_reason, c.text) for c in o.outputs]
                         for o in res]
        outs[overlap, "stats"] = llm.stats()
    return outs


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_greedy_equal_with_stops_and_limits(tiny_model_dirs, kind):
    prompts = random_prompts(MIXED, seed=11)
    # Stop ids that the tiny models do emit, so some requests end early, one step "late".
    probe = LLM(tiny_model_dirs[kind], device="cpu", async_scheduling=False)
    first = probe.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                           use_tqdm=False)
    stop_ids = sorted({o.outputs[0].token_ids[5] for o in first[:4]})
    params = [SamplingParams(temperature=0, max_tokens=m, stop_token_ids=stop_ids, min_tokens=mt,
                             ignore_eos=True)
              for m, mt in zip([1, 2, 30, 7, 25, 3, 40, 9, 18, 5], [0, 0, 6, 0, 0, 2, 0, 0, 7, 0])]
    outs = _run(tiny_model_dirs[kind], prompts, params)
    assert outs[True] == outs[False]
    reasons = {c[1] for o in outs[True] for c in o}
    assert reasons == {"stop", "length"}  # both kinds of ending were exercised
    for o, p in zip(outs[True], params):
        assert len(o[0][0]) <= p.max_tokens  # never a token beyond max_tokens


def test_equal_under_preemption_chunking_and_prefix_cache(tiny_model_dirs):
    shared = random_prompts([40], seed=3)[0]
    prompts = [shared + t for t in random_prompts([5, 30, 12, 44, 1, 20, 9, 35], seed=4)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs = _run(tiny_model_dirs["qwen2"], prompts, params, num_kv_blocks=16,
                max_num_batched_tokens=48)
    assert outs[True] == outs[False]
    assert outs[True, "stats"]["num_preemptions"] > 0
    assert outs[True, "stats"]["prefix_cache_hits"] > 0


def test_equal_with_sampling_features(tiny_model_dirs):
    """Seeds, penalties (which must count the in-flight token), n > 1 and logprobs."""
    prompts = random_prompts([10, 25, 4], seed=5)
    params = [SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=16, n=2, ignore_eos=True),
              SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=0.8,
                             presence_penalty=0.5, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, logprobs=3, max_tokens=8, ignore_eos=True)]
    outs = {}
    for overlap in (False, True):
        llm = LLM(tiny_model_dirs["llama"], device="cpu", async_scheduling=overlap)
        res = llm.generate(prompts, params, use_tqdm=False)
        outs[overlap] = [[(c.token_ids, c.logprobs) for c in o.outputs] for o in res]
    assert outs[True] == outs[False]
    penalised = outs[True][1][0][0]
    assert len(set(penalised)) > len(penalised) // 2  # the penalties did act


def test_stop_strings_on_embedded_model(smollm_dir):
    prompt = [{"role": "user", "content": "Count from one to twenty in words, comma separated."}]
    outs = {}
    for overlap in (False, True):
        llm = LLM(smollm_dir, device="cpu", dtype="float32", async_scheduling=overlap)
        free = llm.chat(prompt, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
        text = free[0].outputs[0].text
        # Stop strings taken from the model's own text, so they do occur mid-generation.
        stops = [text[len(text) // 3:len(text) // 3 + 4], text[len(text) // 2:len(text) // 2 + 3]]
        params = [SamplingParams(temperature=0, max_tokens=40, stop=[stops[0]]),
                  SamplingParams(temperature=0, max_tokens=40, stop=[stops[1]],
                                 include_stop_str_in_output=True)]
        res = free[0].outputs + [llm.chat(prompt, p, use_tqdm=False)[0].outputs[0] for p in params]
        outs[overlap] = [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in res]
    assert outs[True] == outs[False]
    assert [o[3] for o in outs[True][1:]] == stops
    assert stops[0] not in outs[True][1][1] and outs[True][2][1].endswith(stops[1])


def test_abort_mid_run_leaves_engine_clean(tiny_model_dirs):
    """Abort with a step in flight: its token is dropped, its blocks return, others go on."""
    llm = LLM(tiny_model_dirs["llama"], device="cpu", async_scheduling=True)
    engine = llm.engine
    prompts = random_prompts([20, 20, 20], seed=8)
    reference = [o.outputs[0].token_ids for o in llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)]
    from minivllm.engine.input_processor import ProcessedPrompt

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for i, p in enumerate(prompts):
        for req in llm.input_processor.make_requests(f"r{i}", ProcessedPrompt(None, p), params):
            engine.add_request(req)
    got: dict[str, list[int]] = {}
    for _ in range(4):
        for out in engine.step().outputs:
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    aborted = child_request_id("r1", 0)
    engine.abort_requests([aborted])
    late = []
    while engine.has_unfinished:
        for out in engine.step().outputs:
            (late if out.request_id == aborted else got.setdefault(out.request_id, [])).extend(
                out.new_token_ids)
    assert late == []  # nothing of the aborted request after the abort
    assert got[child_request_id("r0", 0)] == reference[0]
    assert got[child_request_id("r2", 0)] == reference[2]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    # The engine still serves, with the same results as before.
    again = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == reference


def test_async_scheduling_argument_is_validated(tiny_model_dirs):
    with pytest.raises(ValueError, match="async_scheduling"):
        LLM(tiny_model_dirs["llama"], device="cpu", async_scheduling="yes")
    assert LLM(tiny_model_dirs["llama"], device="cpu").engine.async_scheduling is False
