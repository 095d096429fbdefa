"""Paged decode (split-KV) and varlen prefill kernels against the float32 torch reference.

Every batch covers context lengths 1, block_size - 1, block_size, block_size + 1 and a long
one, in shuffled, non-contiguous block tables over a cache of random data. The cases are a
covering set (each block size, GQA ratio, head dim and dtype appears with several of the
others) rather than the full product, which the interpreter would make too slow for CI.
"""

from __future__ import annotations

import pytest
import torch

from minivllm.kernels.kv_store import store_kv
from minivllm.kernels.paged_decode import MAX_NUM_SPLITS, paged_decode_attention
from minivllm.kernels.paged_prefill import (PrefillConfig, default_prefill_config,
                                             paged_prefill_attention)
from minivllm.kernels.testing import (REL_TOL, make_paged_batch, reference_output,
                                      relative_error)

F32, F16 = torch.float32, torch.float16


def _case_id(value: object) -> str:
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else str(value)


# (block_size, gqa group, head_dim, dtype)
CASES = [
    (16, 1, 64, F32), (16, 4, 128, F16), (16, 8, 64, F32),
    (32, 2, 128, F32), (32, 8, 128, F16), (32, 1, 96, F16),
    (64, 4, 64, F32), (64, 2, 64, F16), (64, 1, 128, F32), (16, 2, 80, F32),
]


def _check(out: torch.Tensor, ref: torch.Tensor, rows: slice, dtype: torch.dtype) -> None:
    err = relative_error(out[rows].cpu(), ref[rows].cpu())
    assert err < REL_TOL[dtype], f"relative error {err:.3g} >= {REL_TOL[dtype]:.0e}"


def _run_decode(batch, num_splits):
    store_kv(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    out = torch.full_like(batch.q, float("nan"))  # poisoned: every real row must be written
    m = batch.meta
    return paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, out, m.seq_lens,
                                  m.query_start_loc, m.block_tables, m.max_seq_len, batch.scale,
                                  num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("block_size,group,head_dim,dtype", CASES, ids=_case_id)
def test_decode(block_size, group, head_dim, dtype, num_splits, device, generator):
    bs = block_size
    long = 4 * bs + 7 if num_splits != 3 else 9 * bs + 3  # 3 splits: several tiles each
    seqs = [(bs + 1, 1), (1, 1), (long, 1), (bs - 1, 1), (bs, 1)]
    batch = make_paged_batch(seqs, block_size=bs, num_kv_heads=2, group=group,
                             head_dim=head_dim, dtype=dtype, device=device,
                             num_padding_tokens=2, generator=generator)
    ref, _, _ = reference_output(batch)
    out = _run_decode(batch, num_splits)
    _check(out, ref, slice(0, len(seqs)), dtype)


def test_decode_many_splits_and_padded_sequences(device, generator):
    """More splits than tiles (empty splits), and padded batch entries with no query."""
    seqs = [(3, 1), (0, 0), (70, 1), (33, 1), (0, 0)]
    batch = make_paged_batch(seqs, block_size=16, num_kv_heads=1, group=4, head_dim=64,
                             dtype=F32, device=device, generator=generator)
    ref, _, _ = reference_output(batch)
    out = _run_decode(batch, MAX_NUM_SPLITS)
    _check(out, ref, slice(0, 3), F32)


# Mixed steps: decode rows, full prefills, and extends reading a cached prefix whose length
# sits on / next to block boundaries; plus a request with an empty query in the middle.
def _mixed_seqs(bs: int) -> list[tuple[int, int]]:
    return [(bs + 1, 1), (bs - 1, bs - 1), (2 * bs + 3, bs + 3), (1, 1), (bs, bs),
            (0, 0), (3 * bs, 5), (bs + 1, bs), (70, 70), (4 * bs + 2, 2 * bs + 1)]


@pytest.mark.parametrize("block_size,group,head_dim,dtype", CASES, ids=_case_id)
def test_prefill_mixed_batch(block_size, group, head_dim, dtype, device, generator):
    batch = make_paged_batch(_mixed_seqs(block_size), block_size=block_size, num_kv_heads=2,
                             group=group, head_dim=head_dim, dtype=dtype, device=device,
                             num_padding_tokens=3, generator=generator)
    ref, _, _ = reference_output(batch)
    m = batch.meta
    store_kv(batch.k, batch.v, batch.k_cache, batch.v_cache, m.slot_mapping)
    out = torch.full_like(batch.q, float("nan"))
    paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, out, m.seq_lens,
                            m.query_start_loc, m.block_tables, m.max_query_len, batch.scale)
    _check(out, ref, slice(0, m.num_actual_tokens), dtype)


@pytest.mark.parametrize("max_query_len_hint,config", [
    (1, None),  # smallest tile: one query token per row group
    (None, PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)),
    (None, PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=2)),
])
def test_prefill_tile_shapes(max_query_len_hint, config, device, generator):
    """Tiles smaller and larger than a cache block, and q tiles of a single token; prefixes
    ending just before, on and after a KV tile edge (where the unmasked loop hands over)."""
    block_n = (config or default_prefill_config(64, F32)).block_n
    seqs = [(40, 40), (37, 20), (5, 1), (16, 16), (90, 33),
            (block_n - 2 + 6, 6), (block_n - 1 + 4, 4), (block_n + 3, 3)]
    batch = make_paged_batch(seqs, block_size=16,
                             num_kv_heads=2, group=2, head_dim=64, dtype=F32, device=device,
                             generator=generator)
    ref, _, _ = reference_output(batch)
    m = batch.meta
    store_kv(batch.k, batch.v, batch.k_cache, batch.v_cache, m.slot_mapping)
    out = torch.full_like(batch.q, float("nan"))
    hint = m.max_query_len if max_query_len_hint is None else max_query_len_hint
    paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, out, m.seq_lens,
                            m.query_start_loc, m.block_tables, hint, batch.scale, config=config)
    _check(out, ref, slice(0, m.num_actual_tokens), F32)
