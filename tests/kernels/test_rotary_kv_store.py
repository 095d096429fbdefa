"""Fused rotary + KV store against the two kernels it replaces (rotary, then store_kv).

The fused kernel must leave the cache byte for byte as rotary-then-store leaves it (model-dtype
and FP8 caches, with and without Qwen3's q/k norm), return the same rotated q, write nothing at
padding slots (-1) or for rows past ``slot_mapping``, and still rotate q for those rows. Runs on
CUDA when present (bfloat16 too), else in the Triton interpreter (float32/float16; FP8 through
the store's exact-rounding emulation, see ``minivllm.kernels.fp8``).
"""

from __future__ import annotations

import pytest
import torch

from minivllm.attention.kv_cache import FP8_KV_DTYPE, quantize_fp8
from minivllm.kernels.kv_store import store_kv
from minivllm.kernels.rotary import rotary_embedding
from minivllm.kernels.rotary_kv_store import rotary_embedding_store_kv
from minivllm.layers.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
MAX_POSITION = 512
NUM_BLOCKS, BLOCK_SIZE = 6, 16


def _case(num_tokens, num_heads, num_kv_heads, head_dim, dtype, kv_fp8, qk_norm, device, gen):
    """Random inputs: q/k/v as strided views of one qkv buffer, random (never zero) caches,
    shuffled slots with some padding and ``num_tokens - 2`` slots (two trailing rows that
    slot_mapping does not cover, as under CUDA-graph padding)."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], dim=-1)
    q = q.reshape(num_tokens, num_heads, head_dim)
    k = k.reshape(num_tokens, num_kv_heads, head_dim)
    v = v.reshape(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen).to(device)
    num_slots = num_tokens - 2
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:num_slots]
    slots[torch.rand(num_slots, generator=gen) < 0.3] = -1
    slots[0] = -1
    slot_mapping = slots.to(torch.int64).to(device)
    shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    scales = {}
    if kv_fp8:
        # Random scales, not 1.0: a kernel that ignores them must fail.
        k_s, v_s = (0.05 + torch.rand(2, generator=gen)).tolist()
        scales = {"k_scale": torch.tensor([k_s], device=device),
                  "v_scale": torch.tensor([v_s], device=device)}
        caches = [quantize_fp8(torch.randn(*shape, generator=gen) * 4, 1.0).to(device)
                  for _ in range(2)]
    else:
        caches = [randn(*shape) for _ in range(2)]
    norm = {}
    if qk_norm:
        norm = {"q_norm_weight": (1 + 0.5 * torch.randn(head_dim, generator=gen)).to(dtype).to(device),
                "k_norm_weight": (1 + 0.5 * torch.randn(head_dim, generator=gen)).to(dtype).to(device),
                "q_eps": 1e-6, "k_eps": 1e-5}
    return q, k, v, positions, slot_mapping, caches, scales, norm


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view(torch.uint8) if t.dtype == FP8_KV_DTYPE else t.cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_fp8", [False, True], ids=["auto", "fp8"])
@pytest.mark.parametrize("num_tokens,qk_norm", [(5, True), (21, False)])
def test_fused_equals_rotary_then_store(dtype, kv_fp8, num_tokens, qk_norm, device, generator):
    # 5 tokens: one head per program (decode-sized launch); 21: several heads per program,
    # with 6 q heads and 3 KV heads the last head block is partly masked.
    num_heads, num_kv_heads, head_dim = (4, 2, 64) if num_tokens <= 16 else (6, 3, 128)
    q, k, v, positions, slot_mapping, caches, scales, norm = _case(
        num_tokens, num_heads, num_kv_heads, head_dim, dtype, kv_fp8, qk_norm, device, generator)
    rotary = RotaryEmbedding(head_dim, MAX_POSITION, rope_theta=1e6).to(device)
    cos, sin = rotary.cos_cache, rotary.sin_cache
    before = [_bytes(c).clone() for c in caches]
    qkv_before = [t.clone() for t in (q, k, v)]

    ref_k_cache, ref_v_cache = (c.clone() for c in caches)
    q_ref, k_rot = rotary_embedding(positions, q, k, cos, sin, **norm)
    store_kv(k_rot, v, ref_k_cache, ref_v_cache, slot_mapping, **scales)

    k_cache, v_cache = caches
    q_out = rotary_embedding_store_kv(positions, q, k, v, k_cache, v_cache, slot_mapping, cos,
                                      sin, **norm, **scales)

    assert q_out.dtype == q_ref.dtype and torch.equal(q_out, q_ref)  # every row, padding too
    assert torch.equal(_bytes(k_cache), _bytes(ref_k_cache))
    assert torch.equal(_bytes(v_cache), _bytes(ref_v_cache))
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), qkv_before))  # inputs untouched
    # Exactly the valid slots changed (so the equality above is not two no-ops agreeing).
    valid = sorted(slot_mapping[slot_mapping >= 0].tolist())
    for cache, old in zip((k_cache, v_cache), before):
        changed = (_bytes(cache) != old).reshape(NUM_BLOCKS * BLOCK_SIZE, -1).any(-1)
        assert changed.nonzero().flatten().tolist() == valid


def test_fused_rejects_mismatched_inputs(device):
    q, k = torch.randn(3, 4, 64, device=device), torch.randn(3, 2, 64, device=device)
    cache = torch.randn(2, 16, 2, 64, device=device)
    rotary = RotaryEmbedding(64, 16, 1e4).to(device)
    positions = torch.zeros(3, dtype=torch.int64, device=device)
    slots = torch.arange(3, dtype=torch.int64, device=device)
    args = (rotary.cos_cache, rotary.sin_cache)
    with pytest.raises(ValueError, match="match the cache"):
        rotary_embedding_store_kv(positions, q, k, k[:, :1], cache, cache.clone(), slots, *args)
    with pytest.raises(ValueError, match="slot_mapping"):
        rotary_embedding_store_kv(positions, q, k, k, cache, cache.clone(),
                                  torch.arange(4, device=device), *args)
    with pytest.raises(ValueError, match="FP8 KV cache needs k_scale"):
        fp8 = cache.to(FP8_KV_DTYPE)
        rotary_embedding_store_kv(positions, q, k, k, fp8, fp8.clone(), slots, *args)
