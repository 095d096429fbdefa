"""The engine with the fused rotary + KV-store kernel equals the engine with rotary, then the
backend's store: same greedy ids and the same KV-cache bytes. The cache is FP8 with scales
computed on the first step, which therefore takes the unfused path: one run covers both paths,
the quantised store and the hand-over between them (the kernel tests cover a model-dtype cache
byte for byte; the interpreter makes each engine run here cost seconds).

On CPU the layer kernels normally stay torch; here both runs force the Triton rotary kernel
(interpreter) so that the only difference is the fusion, switched off with the documented
``MINIVLLM_FUSE_ROPE_STORE=0``.
"""

from __future__ import annotations

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.layers import rotary as rotary_layer
from minivllm.models import llama
from tests.conftest import random_prompts

pytest.importorskip("triton")


def _force_triton(t: torch.Tensor, use_triton: bool | None = None) -> bool:
    return True if use_triton is None else use_triton


def _run(model_dir: str, prompts, fused: bool, monkeypatch, **kw):
    monkeypatch.setenv(llama.FUSE_ROPE_STORE_ENV, "1" if fused else "0")
    llm = LLM(model_dir, device="cpu", dtype="float32", attention_backend="triton",
              max_num_batched_tokens=16, num_kv_blocks=8, **kw)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    runner = llm.engine.executor.runner
    caches = [tuple(t.view(torch.uint8).clone() if t.dtype == torch.float8_e4m3fn else t.clone()
                    for t in c if t is not None) for c in runner.kv_caches]
    return [o.outputs[0].token_ids for o in outs], caches


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; GPU runs tests/gpu")
def test_fused_rope_kv_store_matches_unfused_engine(tiny_model_dirs, monkeypatch):
    monkeypatch.setattr(llama, "fused_kernels_apply", _force_triton)
    monkeypatch.setattr(rotary_layer, "fused_kernels_apply", _force_triton)
    fused_calls = []
    original = rotary_layer.RotaryEmbedding.forward_and_store_kv
    monkeypatch.setattr(rotary_layer.RotaryEmbedding, "forward_and_store_kv",
                        lambda self, *a: fused_calls.append(1) or original(self, *a))
    # A 16-token budget: the 21-token prompt is prefilled in two chunks, the second one in a
    # step with the first request's decode row; then pure decode steps.
    prompts = random_prompts([3, 21], seed=61)
    model = tiny_model_dirs["qwen3_hd64"]
    kv = {"kv_cache_dtype": "fp8", "calculate_kv_scales": True}

    ref_ids, ref_caches = _run(model, prompts, fused=False, monkeypatch=monkeypatch, **kv)
    assert not fused_calls
    ids, caches = _run(model, prompts, fused=True, monkeypatch=monkeypatch, **kv)
    assert fused_calls  # the fused kernel did run ...
    assert ids == ref_ids and all(len(t) == 4 for t in ids)
    for layer, ref_layer in zip(caches, ref_caches, strict=True):  # ... and wrote the same bytes
        for t, ref in zip(layer, ref_layer, strict=True):
            assert torch.equal(t, ref)
    # The scales were computed on the first step (not left at 1.0), identically (compared above).
    assert all(not torch.equal(layer[2], torch.ones(1)) for layer in caches)


def test_bad_env_value_is_a_value_error(monkeypatch):
    monkeypatch.setenv(llama.FUSE_ROPE_STORE_ENV, "yes")
    with pytest.raises(ValueError, match="MINIVLLM_FUSE_ROPE_STORE"):
        llama.fuse_rope_kv_store_from_env()
