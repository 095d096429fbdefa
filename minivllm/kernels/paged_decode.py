"""Triton paged decode attention (one query token per sequence), split-KV flash-decoding.

Grid ``(num_seqs, num_kv_heads, num_splits)``. Each program owns one KV head of one sequence and
one contiguous slice of its context; it loads each KV tile once and scores it against all the
query heads of that KV head's group (GQA packing: the group is the M dimension of the dot).
Partial results (normalised output + log2-sum-exp) go to a float32 scratch and a second, tiny
kernel merges the splits. With one split the first kernel writes the output directly.

Every launch size depends only on ``num_seqs`` (the padded batch), the head counts and the
static ``max_seq_len`` cap: no ``.item()``, no host sync, so the step can be graph-captured.

An FP8 (e4m3) cache is read as bytes and cast exactly to the query dtype in registers; its K/V
scales (read through pointers, so graphs see updates) fold into the softmax scale and output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minivllm.attention.kv_cache import is_fp8
from minivllm.kernels.common import (LOG2_E, cdiv, check_attention_inputs, dot_precision,
                                     next_pow2, num_sms, pdl_options)
from minivllm.kernels.pdl import pdl_enter

# Fixed upper bound on splits: bounds the scratch size and the merge's work per output row.
MAX_NUM_SPLITS = 64


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters and the split heuristic's knobs.

    ``programs_per_sm``: occupancy target that sets the number of splits; ``max_splits`` (at
    most ``MAX_NUM_SPLITS``) and ``min_tokens_per_split`` bound it, since a split shorter than
    a few tiles spends more on fixed costs (Q load, partial write, merge) than it saves.
    """

    # The H100 sweep (tile 32-128, warps 4/8, stages 2-4, caps 32/64, occupancy 2-8) moved no
    # shape by more than ~5%, about run-to-run spread: these are the plain defaults.
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 4
    max_splits: int = 32
    min_tokens_per_split: int = 256
    # FP8 cache and 16-bit queries only: cast K/V to float16 (one instruction per two e4m3
    # values on sm_89+) instead of to the query's bfloat16 (a longer sequence), with q cast to
    # float16 for the dots. Exact for every e4m3 value; q is clamped to float16's range first.
    fp8_via_fp16: bool = False


DEFAULT_DECODE_CONFIG = DecodeConfig()
# FP8 caches: 128-row tiles through float16; 2 warps per program once the batch alone fills
# the GPU (more programs resident per SM). H100 sweeps (kernels.py --tune --decode-only
# --fp8-only): W1's batch 256 x 1k context (Qwen3-0.6B heads) 284.9 µs (bf16 tiles) -> 242.4
# (128 rows, float16) -> 226 (2 warps), against 369 µs for the same KV in bf16; at 1-8
# sequences 4 warps stay better (1 x 16k: 26 vs 30 µs).
DEFAULT_FP8_DECODE_CONFIG = DecodeConfig(block_n=128, fp8_via_fp16=True)
FP8_LARGE_BATCH_DECODE_CONFIG = DecodeConfig(block_n=128, fp8_via_fp16=True, num_warps=2)


def default_decode_config(kv_fp8: bool, num_programs: int = 0, sms: int = 1) -> DecodeConfig:
    """The launch config the kernel uses unless told otherwise: by cache dtype and, for FP8,
    by whether ``num_programs`` (sequences x KV heads) fill ``sms`` SMs twice over."""
    if not kv_fp8:
        return DEFAULT_DECODE_CONFIG
    return FP8_LARGE_BATCH_DECODE_CONFIG if num_programs >= 2 * sms else DEFAULT_FP8_DECODE_CONFIG


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    seq_lens_ptr, query_start_loc_ptr, block_tables_ptr, k_scale_ptr, v_scale_ptr,
    scale_log2,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_c_block, stride_c_slot, stride_c_head, stride_bt_seq,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr, FP8_VIA_FP16: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_row:  # padded sequence without a query
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    # Splits cut the context in whole tiles; trailing splits of a short sequence get none.
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)

    groups = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    heads = kv_head * GROUP + groups
    q_mask = (groups[:, None] < GROUP) & (dims[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + q_row.to(tl.int64) * stride_q_tok + heads[:, None] * stride_q_head
                + dims[None, :], mask=q_mask, other=0.0)
    if KV_FP8:
        # Dequantising is k * k_scale, v * v_scale: the cast to q's dtype is exact, K's scale
        # folds into the softmax scale and V's into the output (one multiply each, not per row).
        scale_log2 = scale_log2 * tl.load(k_scale_ptr)
        if FP8_VIA_FP16:
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    head_offset = kv_head.to(tl.int64) * stride_c_head
    for tile in range(tile_begin, tile_end):
        pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = pos < seq_len
        block = tl.load(block_table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        rows = block * stride_c_block + (pos % BLOCK_SIZE) * stride_c_slot + head_offset
        kv_mask = valid[:, None] & (dims[None, :] < HEAD_DIM)
        k = tl.load(k_cache_ptr + rows[:, None] + dims[None, :], mask=kv_mask,
                    other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + rows[:, None] + dims[None, :], mask=kv_mask,
                    other=0.0).to(q.dtype)
        # Scores in the log2 domain (exp2 is the native instruction), float32 throughout.
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        # Each processed tile holds >= 1 valid key, so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if KV_FP8:
        out = out * tl.load(v_scale_ptr)
    if NUM_SPLITS == 1:
        tl.store(out_ptr + q_row.to(tl.int64) * stride_o_tok + heads[:, None] * stride_o_head
                 + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # Scratch layout [num_seqs, num_heads, NUM_SPLITS, DIM_PAD]; lse -inf marks "no keys".
        part = (seq.to(tl.int64) * NUM_HEADS + heads) * NUM_SPLITS + split
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)),
                       float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=groups < GROUP)
        tl.store(part_out_ptr + part[:, None] * DIM_PAD + dims[None, :], out, mask=q_mask)


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, query_start_loc_ptr,
    stride_o_tok, stride_o_head,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_row:
        return
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, DIM_PAD)
    part = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + splits
    lse = tl.load(part_lse_ptr + part, mask=splits < NUM_SPLITS, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # empty context: all weights 0
    weight = tl.math.exp2(lse - lse_max)
    # Empty splits never wrote their partial output: mask them out rather than trust 0 * junk.
    used = (lse > float("-inf"))[:, None] & (dims[None, :] < HEAD_DIM)
    part_out = tl.load(part_out_ptr + part[:, None] * DIM_PAD + dims[None, :], mask=used,
                       other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(part_out * weight[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + q_row.to(tl.int64) * stride_o_tok + head * stride_o_head + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int,
                      device: torch.device, config: DecodeConfig = DEFAULT_DECODE_CONFIG) -> int:
    """Enough splits to give every SM ``programs_per_sm`` programs, within fixed bounds.

    Depends only on host-static values (padded batch, heads, the ``max_seq_len`` cap), so a
    captured graph keeps a valid grid for any sequence lengths up to the cap.
    """
    wanted = cdiv(config.programs_per_sm * num_sms(device), max(1, num_seqs * num_kv_heads))
    by_length = cdiv(max(1, max_seq_len), config.min_tokens_per_split)
    return max(1, min(config.max_splits, MAX_NUM_SPLITS, wanted, by_length))


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, block_tables: torch.Tensor,
    max_seq_len: int, scale: float, num_splits: int | None = None,
    config: DecodeConfig | None = None, k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context; writes ``out``.

    Args:
        q, out: ``[num_tokens, num_heads, head_dim]``; sequence ``i`` reads and writes row
            ``query_start_loc[i]`` (sequences with an empty query are skipped).
        seq_lens: int32 ``[num_seqs]`` context lengths including the new token.
        max_seq_len: host upper bound on ``seq_lens`` (may be a static cap); sizes the splits.
        num_splits: override the heuristic (tests use it to force the merge path).
        config: launch parameters (default: :func:`default_decode_config` for the cache).
        k_scale, v_scale: an FP8 (e4m3) cache's float32 scales (one element each), else None.
    """
    group = check_attention_inputs(q, k_cache, v_cache, out, k_scale, v_scale)
    kv_fp8 = is_fp8(k_cache)
    num_seqs = seq_lens.shape[0]
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_heads = q.shape[1]
    if num_seqs == 0:
        return out
    config = config or default_decode_config(kv_fp8, num_seqs * num_kv_heads, num_sms(q.device))
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, q.device, config)
    if not 1 <= num_splits <= MAX_NUM_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_NUM_SPLITS}], got {num_splits}")
    dim_pad = next_pow2(head_dim)
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, dim_pad, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32,
                               device=q.device)
    else:
        part_out = part_lse = out  # unused by the single-split variant
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse,
        seq_lens, query_start_loc, block_tables,
        k_scale if kv_fp8 else q, v_scale if kv_fp8 else q,  # unread unless FP8
        scale * LOG2_E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=max(16, next_pow2(group)),
        HEAD_DIM=head_dim, DIM_PAD=dim_pad, BLOCK_SIZE=block_size,
        BLOCK_N=config.block_n, NUM_SPLITS=num_splits, PRECISION=dot_precision(q.dtype),
        # float32 queries keep their precision (the float16 path is for 16-bit models).
        KV_FP8=kv_fp8, FP8_VIA_FP16=kv_fp8 and config.fp8_via_fp16 and q.element_size() == 2,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_options(q.device),
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            out, part_out, part_lse, query_start_loc, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, DIM_PAD=dim_pad,
            NUM_SPLITS=num_splits, SPLITS_PAD=next_pow2(num_splits),
            num_warps=4 if dim_pad >= 128 else 2, **pdl_options(q.device),
        )
    return out
