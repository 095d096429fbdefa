"""KV store kernel: rows land at their slots, padding slots (-1) and all other slots untouched."""

from __future__ import annotations

import pytest
import torch

from minivllm.attention.torch_ref import store_kv_reference
from minivllm.kernels.kv_store import store_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(16, 2, 64), (64, 3, 128),
                                                              (32, 1, 80)])
def test_store_matches_reference(dtype, block_size, num_kv_heads, head_dim, device, generator):
    num_blocks, num_tokens = 7, 40
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=generator).to(dtype).to(device)
    v_cache = torch.randn(cache_shape, generator=generator).to(dtype).to(device)
    # k/v as strided views of one fused buffer, as a QKV projection produces them.
    fused = torch.randn(num_tokens + 3, 2 * num_kv_heads + 1, head_dim,
                        generator=generator).to(dtype).to(device)
    k, v = fused[:, :num_kv_heads], fused[:, num_kv_heads + 1:]
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    padding = torch.rand(num_tokens, generator=generator) < 0.25
    slot_mapping = torch.where(padding, -1, slots).to(torch.int64).to(device)

    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    store_kv_reference(k, v, ref_k, ref_v, slot_mapping)
    before_k = k_cache.clone()
    store_kv(k, v, k_cache, v_cache, slot_mapping)

    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    # The store did something, and only at the valid slots.
    changed = (k_cache != before_k).flatten(2).any(-1).flatten()
    valid_slots = slot_mapping[slot_mapping >= 0].cpu()
    assert changed.cpu().nonzero().flatten().tolist() == sorted(valid_slots.tolist())


def test_store_rejects_bad_layouts(device):
    k = torch.randn(4, 2, 64, device=device)
    slots = torch.arange(4, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="multiple of 16"):
        cache = torch.randn(2, 24, 2, 64, device=device)
        store_kv(k, k, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="num_kv_heads, head_dim"):
        cache = torch.randn(2, 16, 4, 64, device=device)
        store_kv(k, k, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="contiguous"):
        cache = torch.randn(2, 2, 16, 64, device=device).transpose(1, 2)
        store_kv(k, k, cache, cache.clone(), slots)
