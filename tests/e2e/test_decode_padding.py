"""The CUDA-graph decode path's padded static buffers, run eagerly (no GPU needed): padding rows
must write nothing and change nothing, whatever the batch size and its captured bucket."""

from __future__ import annotations

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.runner.cuda_graphs import DecodeGraphRunner, capture_sizes
from tests.conftest import random_prompts

pytest.importorskip("triton")


def test_capture_sizes_cover_every_batch_up_to_the_limit():
    sizes = capture_sizes(256)
    assert sizes[0] == 1 and sizes[-1] == 256
    assert capture_sizes(5)[-1] == 5 and capture_sizes(1000)[-1] == 256


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; GPU runs tests/gpu")
def test_padded_decode_buffers_match_plain_decode(tiny_model_dirs):
    prompts = random_prompts([3, 17, 40, 16, 9], seed=41)
    # Different lengths: the batch shrinks 5 → 1 as requests finish, crossing buckets 8/4/2/1.
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 6, 9, 12, 4)]
    kw = dict(device="cpu", dtype="float32", attention_backend="triton", max_model_len=96)
    plain = LLM(tiny_model_dirs["qwen3_hd64"], **kw)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]

    padded = LLM(tiny_model_dirs["qwen3_hd64"], **kw)
    runner = padded.engine.executor.runner
    graphs = DecodeGraphRunner(runner.model, runner.kv_caches, [1, 2, 4, 8], max_model_len=96,
                               block_size=runner.block_size, device=runner.device,
                               dtype=runner.dtype, use_graphs=False)
    runner.decode_graphs = graphs
    calls = []
    original_run = graphs.run
    graphs.run = lambda inputs: calls.append(inputs.meta.num_seqs) or original_run(inputs)
    got = [o.outputs[0].token_ids for o in padded.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert {5, 3, 1} <= set(calls)  # padded to 8 and 4, and exact at 1
    # Padding rows wrote nowhere: every cache row outside the requests' blocks is still zero.
    used = padded.stats()["num_kv_blocks"]
    k_cache = runner.kv_caches[0][0]
    touched = (k_cache.abs().sum(dim=(1, 2, 3)) != 0).nonzero().flatten().tolist()
    assert len(touched) < used and max(touched) < 20


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; GPU runs tests/gpu")
def test_prefill_warm_up_runs_every_bucket_and_writes_nothing(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["qwen3_hd64"], device="cpu", dtype="float32", attention_backend="triton",
              max_model_len=96, num_kv_blocks=8)
    runner = llm.engine.executor.runner
    calls = []
    forward = runner.model.forward
    runner.model.forward = lambda ids, *a: calls.append(len(ids)) or forward(ids, *a)
    runner.warm_up_prefill(max_num_batched_tokens=64, max_model_len=96, force=True)
    assert calls == [2, 4, 8, 16, 32, 64]
    assert all(not k.any() and not v.any() for k, v, *_ in runner.kv_caches)  # slots -1: untouched
    # The engine still generates normally afterwards.
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
