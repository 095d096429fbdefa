"""Prompt logprobs on a GPU (device→host copies without a sync, CUDA graphs and overlapped
scheduling on). Skipped without CUDA; run with ``PYTHONPATH=. python -m pytest -q
tests/gpu/test_prompt_logprobs_cuda.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minivllm import LLM, SamplingParams
from tests.conftest import random_prompts
from tests.e2e.test_prompt_logprobs import check_against_hf, hf_prompt_logprobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

QWEN3_06B = str(Path(__file__).resolve().parents[2] / "benchmarks" / "models" / "qwen3-0.6b")


def test_tiny_float32_matches_hf_across_chunks_and_prefix_cache(tiny_model_dirs, hf_tiny_models):
    kind = "qwen3_hd64"  # a head size the Triton kernels support
    llm = LLM(tiny_model_dirs[kind], device="cuda", dtype="float32", max_num_batched_tokens=32,
              num_kv_blocks=64)
    long_prompt, other, plain = random_prompts([80, 45, 30], seed=81)
    shared = long_prompt[:64] + other[:10]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with_plp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=5)
    alone = llm.generate([plain], greedy, use_tqdm=False)[0]
    outs = llm.generate([plain, long_prompt, other, shared], [greedy, with_plp, with_plp, with_plp],
                        use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone.outputs[0].token_ids
    for prompt, out in zip([long_prompt, other, shared], outs[1:]):
        check_against_hf(out.prompt_logprobs, prompt, 5, hf_prompt_logprobs(hf_tiny_models[kind], prompt))


def test_qwen3_bf16_prompt_logprobs_agree_with_decode_logprobs():
    """Prompt logprobs of prompt + its greedy continuation equal the logprobs the decode steps
    gave those tokens (prefill vs decode kernels, bf16: a small tolerance)."""
    llm = LLM(QWEN3_06B, load_format="dummy", seed=0, max_num_batched_tokens=256)
    prompt = random_prompts([700], vocab=150000, seed=82)[0]  # Qwen3's vocabulary is 151,936
    gen = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32, logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    full = prompt + gen.token_ids[:-1]
    out = llm.generate([full], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3),
                       use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == len(full) and out.prompt_logprobs[0] is None
    for i, tid in enumerate(gen.token_ids[:-1]):
        from_prompt = out.prompt_logprobs[len(prompt) + i][tid]
        from_decode = gen.logprobs[i][tid]
        assert abs(from_prompt.logprob - from_decode.logprob) < 0.1, (i, from_prompt, from_decode)
        assert len(out.prompt_logprobs[len(prompt) + i]) in (3, 4)
