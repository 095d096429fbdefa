"""The Triton backend end to end (store + attend) against the torch reference backend."""

from __future__ import annotations

import pytest
import torch

from minivllm.attention.selector import get_attention_backend
from minivllm.attention.triton_backend import TritonAttentionBackend
from minivllm.kernels.testing import (REL_TOL, make_paged_batch, reference_output,
                                      relative_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("seqs", [
    [(17, 1), (1, 1), (90, 1), (32, 1)],                # pure decode: split-KV path
    [(17, 1), (40, 24), (1, 1), (33, 33), (64, 16)],    # mixed decode + prefill + extend
], ids=["decode", "mixed"])
def test_backend_matches_reference(seqs, dtype, device, generator):
    batch = make_paged_batch(seqs, block_size=16, num_kv_heads=2, group=4, head_dim=64,
                             dtype=dtype, device=device, num_padding_tokens=3,
                             generator=generator)
    ref_out, ref_k, ref_v = reference_output(batch, dtype)
    backend = get_attention_backend("triton", batch.q.device)
    assert isinstance(backend, TritonAttentionBackend)
    out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta,
                          batch.scale)
    n = batch.meta.num_actual_tokens
    err = relative_error(out[:n].float().cpu(), ref_out[:n].float().cpu())
    assert err < REL_TOL[dtype], f"relative error {err:.3g}"
    # Same cache as the reference store: new rows at their slots, padding slots (-1) and every
    # other slot untouched (a write to slot -1 would land on the cache's last row).
    assert torch.equal(batch.k_cache, ref_k) and torch.equal(batch.v_cache, ref_v)


def test_backend_rejects_mismatched_dtype(device, generator):
    batch = make_paged_batch([(5, 1)], block_size=16, num_kv_heads=1, group=2, head_dim=64,
                             dtype=torch.float32, device=device, generator=generator)
    with pytest.raises(ValueError, match="dtype"):
        TritonAttentionBackend().forward(batch.q.half(), batch.k, batch.v, batch.k_cache,
                                         batch.v_cache, batch.meta, batch.scale)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only")
def test_backend_refuses_bfloat16_on_cpu(generator):
    batch = make_paged_batch([(5, 1)], block_size=16, num_kv_heads=1, group=2, head_dim=64,
                             dtype=torch.bfloat16, generator=generator)
    with pytest.raises(ValueError, match="bfloat16"):
        TritonAttentionBackend().forward(batch.q, batch.k, batch.v, batch.k_cache,
                                         batch.v_cache, batch.meta, batch.scale)


def test_backend_reads_kv_stored_before_forward(device, generator):
    """``k=v=None`` (the fused rotary + KV-store kernel wrote them): the backend attends over
    this step's K/V already in the cache; the torch oracle refuses (it always stores)."""
    from minivllm.attention.torch_ref import TorchReferenceBackend, store_kv_reference

    batch = make_paged_batch([(17, 1), (40, 24)], block_size=16, num_kv_heads=2, group=2,
                             head_dim=64, dtype=torch.float32, device=device,
                             num_padding_tokens=2, generator=generator)
    ref_out, _, _ = reference_output(batch)
    m = batch.meta
    store_kv_reference(batch.k, batch.v, batch.k_cache, batch.v_cache, m.slot_mapping)
    out = TritonAttentionBackend().forward(batch.q, None, None, batch.k_cache, batch.v_cache, m,
                                           batch.scale)
    n = m.num_actual_tokens
    assert relative_error(out[:n].cpu(), ref_out[:n].cpu()) < REL_TOL[torch.float32]
    with pytest.raises(ValueError, match="both"):
        TritonAttentionBackend().forward(batch.q, batch.k, None, batch.k_cache, batch.v_cache,
                                         m, batch.scale)
    with pytest.raises(ValueError, match="stores K/V itself"):
        TorchReferenceBackend().forward(batch.q, None, None, batch.k_cache, batch.v_cache, m,
                                        batch.scale)
