"""Triton varlen attention over the paged cache for mixed batches (prefill, extend, decode rows).

Each request's query rows are the last ``query_len`` positions of its context; everything before
them (a cached prefix, earlier chunks) is read from the paged cache through the block table, as
are the new tokens themselves (the store kernel runs first). Causal.

Grid ``(num_tokens // BLOCK_Q + num_seqs, num_kv_heads)``: request ``i`` owns the tile ids from
``query_start_loc[i] // BLOCK_Q + i`` on, which is at least as many as it needs; a program finds
its request by binary search and leaves if its tile is past the request's queries. The grid thus
depends only on the (padded) token and sequence counts, never on the lengths' values.

GQA packing: a tile's ``BLOCK_M`` rows are ``BLOCK_Q`` query tokens x ``GROUP_PAD`` query heads
of one KV head (row ``r`` is token ``r // GROUP_PAD``, head ``r % GROUP_PAD``), so every K/V tile
loaded is used by all heads that share it.

An FP8 (e4m3) cache is dequantised in registers as in the decode kernel (exact cast, scales
folded into the softmax scale and the output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minivllm.attention.kv_cache import is_fp8
from minivllm.kernels.common import LOG2_E, check_attention_inputs, dot_precision, next_pow2


@dataclass(frozen=True)
class PrefillConfig:
    """Tile shape and pipelining; ``block_m`` is the largest M tile (shrunk for short queries)."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3


def default_prefill_config(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> PrefillConfig:
    """Tile choice per head dim and dtype (shared memory holds ``num_stages`` K/V tiles)."""
    if dtype == torch.float32:  # 4-byte tiles: the 16-bit config would need ~260 KB of smem
        return PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    # H100, 4k tokens (benchmarks/results/kernels-h100-2026-11-23-tune.json): D=128 block_n 128
    # 339 TFLOP/s vs 64: 306; D=64: 8 warps 277 vs 4 warps 259. Both 128-row tiles, no spills.
    if head_dim <= 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)


@triton.jit
def _load_kv_tile(cache_ptr, rows, dims, valid, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                  MASKED: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """``[BLOCK_N, DIM_PAD]`` rows of one KV head in ``OUT_DTYPE`` (an FP8 cache's exact cast;
    a no-op otherwise); unmasked tiles of a power-of-two head dim load with no mask at all,
    which keeps the loads wide and the pipeline simple."""
    ptrs = cache_ptr + rows[:, None] + dims[None, :]
    if MASKED:
        tile = tl.load(ptrs, mask=valid[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM == DIM_PAD:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=dims[None, :] < HEAD_DIM, other=0.0)
    return tile.to(OUT_DTYPE)


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, block_table, head_offset, start_n,
    q_pos, seq_len, dims, scale_log2,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, stride_c_block, stride_c_slot, MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One online-softmax step over keys ``[start_n, start_n + BLOCK_N)``."""
    pos = start_n + tl.arange(0, BLOCK_N)
    valid = pos < seq_len
    if MASKED:
        block = tl.load(block_table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    else:
        block = tl.load(block_table + pos // BLOCK_SIZE).to(tl.int64)
    rows = block * stride_c_block + (pos % BLOCK_SIZE) * stride_c_slot + head_offset
    k = _load_kv_tile(k_cache_ptr, rows, dims, valid, HEAD_DIM, DIM_PAD, MASKED, q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    if MASKED:
        s = tl.where((pos[None, :] <= q_pos[:, None]) & (pos[None, :] < seq_len), s,
                     float("-inf"))
    # Key 0 is visible to every row and sits in the first tile processed, so m_new is finite.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _load_kv_tile(v_cache_ptr, rows, dims, valid, HEAD_DIM, DIM_PAD, MASKED, q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


# ``num_seqs`` varies step by step: specialising on it (== 1, divisible by 16) would compile
# new variants in the middle of serving.
@triton.jit(do_not_specialize=["num_seqs"])
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    seq_lens_ptr, query_start_loc_ptr, block_tables_ptr, k_scale_ptr, v_scale_ptr,
    num_seqs, scale_log2,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_c_block, stride_c_slot, stride_c_head, stride_bt_seq,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD
    # Reversed, so that the costliest tiles (last queries, most keys) start first and the
    # cheap ones fill the tail of the launch.
    tile_id = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)

    # Largest seq with first tile id <= tile_id (tile ids start at qsl[seq] // BLOCK_Q + seq).
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile_id:
            lo = mid
        else:
            hi = mid - 1
    seq = lo
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile = tile_id - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - q_len  # context already cached before this step's queries

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, DIM_PAD)
    tok = q_tile * BLOCK_Q + rows // GROUP_PAD
    group = rows % GROUP_PAD
    heads = kv_head * GROUP + group
    row_mask = (tok < q_len) & (group < GROUP)
    q_mask = row_mask[:, None] & (dims[None, :] < HEAD_DIM)
    q_offsets = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_offsets[:, None] * stride_q_tok + heads[:, None] * stride_q_head
                + dims[None, :], mask=q_mask, other=0.0)
    q_pos = prefix_len + tok
    if KV_FP8:
        # Dequantising is k * k_scale, v * v_scale: K's scale folds into the softmax scale and
        # V's into the output, so the tiles only need the (exact) cast to q's dtype.
        scale_log2 = scale_log2 * tl.load(k_scale_ptr)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    head_offset = kv_head.to(tl.int64) * stride_c_head

    # Keys <= the tile's first query position are visible to all its rows: no masking there.
    first_pos = prefix_len + q_tile * BLOCK_Q
    last_pos = tl.minimum(first_pos + BLOCK_Q, seq_len) - 1
    unmasked_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    for start_n in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, block_table, head_offset, start_n,
            q_pos, seq_len, dims, scale_log2, HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_N,
            stride_c_block, stride_c_slot, False, PRECISION)
    for start_n in range(unmasked_end, last_pos + 1, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, block_table, head_offset, start_n,
            q_pos, seq_len, dims, scale_log2, HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_N,
            stride_c_block, stride_c_slot, True, PRECISION)

    out = acc / l_i[:, None]
    if KV_FP8:
        out = out * tl.load(v_scale_ptr)
    tl.store(out_ptr + q_offsets[:, None] * stride_o_tok + heads[:, None] * stride_o_head
             + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, block_tables: torch.Tensor,
    max_query_len: int, scale: float, config: PrefillConfig | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention for any mix of decode rows, prefill and extend chunks; writes ``out``.

    Args:
        q, out: ``[num_tokens, num_heads, head_dim]``; request ``i`` owns rows
            ``query_start_loc[i]:query_start_loc[i+1]`` (rows past the last are left alone).
        seq_lens: int32 ``[num_seqs]``; context length including this step's queries, whose
            K/V must already be in the cache.
        max_query_len: host upper bound on query lengths; only shrinks the tile for short ones.
        k_scale, v_scale: an FP8 (e4m3) cache's float32 scales (one element each), else None.
    """
    group = check_attention_inputs(q, k_cache, v_cache, out, k_scale, v_scale)
    kv_fp8 = is_fp8(k_cache)
    num_seqs = seq_lens.shape[0]
    num_tokens = q.shape[0]
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if num_seqs == 0 or num_tokens == 0:
        return out
    if config is None:
        config = default_prefill_config(head_dim, q.dtype)
    group_pad = next_pow2(group)
    # Short queries (decode rows, small chunks) would leave most of a 128-row tile idle.
    block_m = max(group_pad, 16, min(config.block_m, next_pow2(max(1, max_query_len)) * group_pad))
    block_q = block_m // group_pad
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, seq_lens, query_start_loc, block_tables,
        k_scale if kv_fp8 else q, v_scale if kv_fp8 else q,  # unread unless FP8
        num_seqs, scale * LOG2_E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, DIM_PAD=next_pow2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=config.block_n,
        PRECISION=dot_precision(q.dtype), KV_FP8=kv_fp8,
        num_warps=config.num_warps if block_m >= 64 else 4, num_stages=config.num_stages,
    )
    return out
