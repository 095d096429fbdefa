"""The fused rotary + KV-store kernel on a GPU, bf16: the kernel against rotary-then-store (same
q, same cache bytes), and the engine (CUDA graphs, async scheduling, Qwen3-0.6B dummy weights)
with the fusion on against ``MINIVLLM_FUSE_ROPE_STORE=0``: same greedy ids, same KV-cache bytes.
Skipped without CUDA (CI); run on the device with
``PYTHONPATH=. python -m pytest -q tests/gpu/test_fused_rope_kv_store_cuda.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.attention.kv_cache import FP8_KV_DTYPE
from minivllm.models.llama import FUSE_ROPE_STORE_ENV

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

QWEN3_06B = str(Path(__file__).resolve().parents[2] / "benchmarks" / "models" / "qwen3-0.6b")
BF16 = torch.bfloat16


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_KV_DTYPE else t


@pytest.mark.parametrize("num_tokens", [1, 8, 300])
@pytest.mark.parametrize("kv_fp8", [False, True], ids=["bf16-cache", "fp8-cache"])
def test_kernel_bf16_equals_rotary_then_store(num_tokens, kv_fp8):
    from minivllm.kernels.kv_store import store_kv
    from minivllm.kernels.rotary import rotary_embedding
    from minivllm.kernels.rotary_kv_store import rotary_embedding_store_kv
    from minivllm.layers.rotary import RotaryEmbedding

    g = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    hq, hkv, d, num_blocks, block_size = 16, 8, 128, 64, 16  # Qwen3-0.6B's heads

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(BF16)

    qkv = randn(num_tokens, (hq + 2 * hkv) * d)
    q, k, v = (t.reshape(num_tokens, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], -1))
    positions = torch.randint(0, 4096, (num_tokens,), generator=g, device="cuda")
    slots = torch.randperm(num_blocks * block_size, generator=g, device="cuda")[:num_tokens]
    slots[::3] = -1  # padding rows
    norm = {"q_norm_weight": 1 + randn(d) / 2, "k_norm_weight": 1 + randn(d) / 2,
            "q_eps": 1e-6, "k_eps": 1e-6}
    rotary = RotaryEmbedding(d, 4096, 1e6).cuda()
    shape = (num_blocks, block_size, hkv, d)
    scales = {}
    caches = [randn(*shape), randn(*shape)]
    if kv_fp8:
        scales = {"k_scale": torch.tensor([0.37], device="cuda"),
                  "v_scale": torch.tensor([0.11], device="cuda")}
        caches = [c.to(FP8_KV_DTYPE) for c in caches]
    ref = [c.clone() for c in caches]

    q_ref, k_rot = rotary_embedding(positions, q, k, rotary.cos_cache, rotary.sin_cache, **norm)
    store_kv(k_rot, v, *ref, slots, **scales)
    q_out = rotary_embedding_store_kv(positions, q, k, v, *caches, slots, rotary.cos_cache,
                                      rotary.sin_cache, **norm, **scales)
    assert torch.equal(q_out, q_ref)
    for got, want in zip(caches, ref):
        assert torch.equal(_bytes(got), _bytes(want))


def _generate(prompts, fused: bool, monkeypatch, **kw):
    monkeypatch.setenv(FUSE_ROPE_STORE_ENV, "1" if fused else "0")
    llm = LLM(QWEN3_06B, load_format="dummy", seed=0, dtype="bfloat16", max_model_len=2048,
              num_kv_blocks=400, **kw)
    runner = llm.engine.executor.runner
    assert runner.backend.supports_fused_kv_store
    assert all(layer.self_attn.fuse_rope_kv_store == fused for layer in runner.model.layers)
    params = SamplingParams(temperature=0, max_tokens=32, logprobs=1, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert runner.decode_graphs is not None  # the decode steps ran in CUDA graphs
    caches = [tuple(_bytes(t).clone() for t in c if t is not None) for c in runner.kv_caches]
    del llm, runner
    torch.cuda.empty_cache()
    return outs, caches


@pytest.mark.parametrize("kv", [{}, {"kv_cache_dtype": "fp8", "calculate_kv_scales": True}],
                         ids=["auto", "fp8-calculated-scales"])
def test_engine_fused_equals_unfused(monkeypatch, kv):
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    prompts = [torch.randint(0, 151936, (n,), generator=g).tolist() for n in (1, 17, 200, 700)]
    ref_outs, ref_caches = _generate(prompts, False, monkeypatch, **kv)
    outs, caches = _generate(prompts, True, monkeypatch, **kv)
    for r, o in zip(ref_outs, outs):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
    for layer, ref_layer in zip(caches, ref_caches, strict=True):
        for t, ref in zip(layer, ref_layer, strict=True):
            assert torch.equal(t, ref)
