"""``kv_cache_dtype="fp8"`` through the engine: accuracy on the embedded SmolLM2 against HF
float32 (teacher-forced), the Triton backend against the torch reference, the cache's size, and
start-up errors."""

from __future__ import annotations

import logging

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.attention.base import AttentionBackend
from minivllm.attention.kv_cache import FP8_E4M3_MAX
from minivllm.runner.model_runner import CPU_KV_CACHE_BYTES
from tests.conftest import random_prompts

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
NEW_TOKENS = 16
# Mean |logprob(fp8 engine) - logprob(HF float32)| over each step's top-5 tokens, teacher-forced
# on the fp8 engine's own tokens. e4m3 keeps 3 mantissa bits: every cached K/V element is off by
# up to 2**-4 of its size, which moves SmolLM2's scores (|k| up to ~20) by a few hundredths
# per layer. Measured: 0.15 on 4 prompts x 32 tokens, with scales 1.0 or computed alike (HF
# bfloat16 weights and activations against float32: 0.056). Twice the measurement; a scale
# dropped anywhere (they are ~0.01-0.04 here) or a misread byte gives errors of several nats.
MEAN_LOGPROB_TOL = 0.3
# Teacher-forced greedy disagreements with float32: 8 of 128 steps measured (near-ties).
MAX_FLIP_FRACTION = 0.25


def test_fp8_smollm_close_to_float32(smollm_dir, hf_smol, caplog):
    caplog.set_level(logging.INFO)
    llm = LLM(smollm_dir, device="cpu", dtype="float32", kv_cache_dtype="fp8",
              calculate_kv_scales=True)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=5, ignore_eos=True)
    outs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], params, use_tqdm=False)
    errors, flips = [], 0
    for out in outs:
        tokens = out.outputs[0].token_ids
        ids = torch.tensor([out.prompt_token_ids + tokens])
        with torch.no_grad():
            ref = hf_smol(ids).logits[0].float().log_softmax(-1)
        for step, (tok, lps) in enumerate(zip(tokens, out.outputs[0].logprobs)):
            pos = len(out.prompt_token_ids) - 1 + step
            errors += [abs(lp.logprob - ref[pos, t].item()) for t, lp in lps.items()]
            flips += int(ref[pos].argmax().item() != tok)
    mean = sum(errors) / len(errors)
    print(f"fp8 KV vs float32: mean |dlogprob| {mean:.4f} max {max(errors):.4f}; "
          f"greedy flips {flips}/{len(outs) * NEW_TOKENS}")
    assert mean < MEAN_LOGPROB_TOL
    assert flips <= MAX_FLIP_FRACTION * len(outs) * NEW_TOKENS

    runner = llm.engine.executor.runner
    layer0 = runner.kv_caches[0]
    assert layer0.k.dtype == torch.float8_e4m3fn and layer0.k.element_size() == 1
    # Scales came from the first step (amax / 448 of SmolLM2's |k| ~10-20, |v| ~0.5-10).
    k_scales = torch.cat([c.k_scale for c in runner.kv_caches])
    v_scales = torch.cat([c.v_scale for c in runner.kv_caches])
    assert ((k_scales > 1 / FP8_E4M3_MAX) & (k_scales < 100 / FP8_E4M3_MAX)).all()
    assert ((v_scales > 0.05 / FP8_E4M3_MAX) & (v_scales < 100 / FP8_E4M3_MAX)).all()
    assert not runner.kv_scales_pending
    # One byte per element: the CPU's fixed budget holds 4x the float32 cache's blocks.
    arch = llm.config.arch
    per_block_fp8 = 2 * arch.num_hidden_layers * 16 * arch.num_key_value_heads * arch.head_dim
    assert llm.stats()["num_kv_blocks"] == CPU_KV_CACHE_BYTES // per_block_fp8
    assert llm.stats()["kv_cache_dtype"] == "fp8"
    assert "fp8 e4m3" in caplog.text and "4x the blocks of float32" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; GPU runs tests/gpu")
def test_triton_fp8_matches_torch_fp8_through_the_engine(tiny_model_dirs):
    """Both backends quantise to the same bytes and read them alike: equal greedy tokens, with
    chunked prefill, prefix-cache hits and scales computed from the first step."""
    pytest.importorskip("triton")
    shared = random_prompts([20], seed=41)[0]
    prompts = random_prompts([3, 30], seed=42) + [shared + [7], shared + [8, 9]]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    ids = {}
    for backend in ("torch", "triton"):
        llm = LLM(tiny_model_dirs["qwen3_hd64"], device="cpu", dtype="float32",
                  attention_backend=backend, kv_cache_dtype="fp8", calculate_kv_scales=True,
                  max_num_batched_tokens=24)
        outs = llm.generate(prompts, params, use_tqdm=False)
        ids[backend] = [o.outputs[0].token_ids for o in outs]
        scales = [c.k_scale.item() for c in llm.engine.executor.runner.kv_caches]
        assert all(s != 1.0 for s in scales)
    assert ids["triton"] == ids["torch"]


def test_backend_without_fp8_is_refused_at_start_up():
    class AutoOnly(AttentionBackend):
        name = "auto-only"

        def forward(self, *args, **kwargs):  # pragma: no cover - never called
            raise NotImplementedError

    AutoOnly.check_kv_cache_dtype("auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="auto-only attention backend supports kv_cache_dtype"):
        AutoOnly.check_kv_cache_dtype("fp8", torch.device("cpu"))


@pytest.mark.parametrize("kwargs,match", [
    ({"kv_cache_dtype": "fp16"}, "kv_cache_dtype"),
    ({"kv_cache_dtype": "fp8", "calculate_kv_scales": "yes"}, "calculate_kv_scales"),
])
def test_bad_kv_cache_arguments(kwargs, match, tiny_model_dirs):
    with pytest.raises(ValueError, match=match):
        LLM(tiny_model_dirs["llama"], device="cpu", **kwargs)
