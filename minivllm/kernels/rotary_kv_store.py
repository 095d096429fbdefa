"""Triton kernel: rotary (with Qwen3's optional q/k norm) and the KV-cache store in one launch.

The unfused layer runs two kernels per attention layer: ``rotary_embedding`` writes the rotated
q and k to new tensors, then ``store_kv`` reads k (and v) back and scatters them into the paged
cache. Here the program that rotates a token's k heads writes them straight to the token's cache
slot, and copies the same v heads beside them; q is rotated into ``q_out`` as before. At batch-1
decode that removes one launch (and a k round trip through memory) per layer.

Numerics are exactly those of rotary-then-store: the rotated k is rounded to the activation
dtype (as ``rotary_embedding`` stores it) before it is cast to the cache dtype or quantised to
FP8 e4m3 with the layer's scale (as ``store_kv`` does), so the cache holds the same bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minivllm.attention.kv_cache import is_fp8
from minivllm.kernels.common import (NO_FP_FUSION, cdiv, check_cache_pair, check_kv_scales,
                                     elementwise_num_warps, next_pow2, pdl_options)
from minivllm.kernels.fp8 import emulate_fp8_cast, quantize_fp8_e4m3
from minivllm.kernels.pdl import pdl_enter
from minivllm.kernels.rotary import (check_rotary_inputs, load_cos_sin, norm_rotate_heads,
                                     rotary_heads_per_program)


@triton.jit
def _to_cache(x, cache_ptr, scale_ptr, KV_FP8: tl.constexpr, EMULATE_FP8_CAST: tl.constexpr):
    """``x`` as the cache stores it: quantised with the scale for FP8, else cast."""
    if KV_FP8:
        y = quantize_fp8_e4m3(x, tl.load(scale_ptr), EMULATE_FP8_CAST)
    else:
        y = x.to(cache_ptr.dtype.element_ty)
    return y


# num_slots (the step's token count) changes every step: one compiled variant for all values,
# or counts of 1 and multiples of 16 would each compile their own after start-up.
@triton.jit(do_not_specialize=["num_slots"])
def _rotary_kv_store_kernel(
    positions_ptr, q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    k_scale_ptr, v_scale_ptr, cos_ptr, sin_ptr, q_w_ptr, k_w_ptr, num_slots,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_block, stride_c_slot, stride_c_head, stride_cache_pos, q_eps, k_eps,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
    APPLY_NORM: tl.constexpr, KV_FP8: tl.constexpr, EMULATE_FP8_CAST: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)  # launched early (see pdl_options): wait for the qkv projection
    # Grid: (token, head block); the first ceil(Hq / BLOCK_H) head blocks are q's, the rest
    # are blocks of KV heads, each storing its k heads (rotated) and v heads (copied).
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    Q_BLOCKS: tl.constexpr = (NUM_Q_HEADS + BLOCK_H - 1) // BLOCK_H
    HALF: tl.constexpr = HEAD_DIM // 2
    out_dtype = q_out_ptr.dtype.element_ty
    pairs = tl.arange(0, HALF_PAD)
    if head_block < Q_BLOCKS:
        # q is rotated for every row, padding included (its attention output is ignored).
        first = head_block * BLOCK_H
        cos, sin = load_cos_sin(positions_ptr, cos_ptr, sin_ptr, token, stride_cache_pos,
                                HEAD_DIM, HALF_PAD)
        out1, out2, mask = norm_rotate_heads(
            q_ptr, q_w_ptr, token, first, stride_q_tok, stride_q_head, q_eps, cos, sin,
            out_dtype, NUM_Q_HEADS, HEAD_DIM, HALF_PAD, BLOCK_H, APPLY_NORM)
        heads = first + tl.arange(0, BLOCK_H)
        dst = q_out_ptr + (token * NUM_Q_HEADS + heads[:, None]) * HEAD_DIM + pairs[None, :]
        tl.store(dst, out1, mask=mask)
        tl.store(dst + HALF, out2, mask=mask)
    else:
        # Rows past slot_mapping's length, and slots < 0 (padding), are never written.
        slot = tl.load(slot_mapping_ptr + token, mask=token < num_slots, other=-1).to(tl.int64)
        if slot >= 0:
            first = (head_block - Q_BLOCKS) * BLOCK_H
            cos, sin = load_cos_sin(positions_ptr, cos_ptr, sin_ptr, token, stride_cache_pos,
                                    HEAD_DIM, HALF_PAD)
            # Rounded to the activation dtype first, as rotary_embedding's k output is.
            k1, k2, mask = norm_rotate_heads(
                k_ptr, k_w_ptr, token, first, stride_k_tok, stride_k_head, k_eps, cos, sin,
                out_dtype, NUM_KV_HEADS, HEAD_DIM, HALF_PAD, BLOCK_H, APPLY_NORM)
            heads = first + tl.arange(0, BLOCK_H)
            v_src = v_ptr + token * stride_v_tok + heads[:, None] * stride_v_head + pairs[None, :]
            v1 = tl.load(v_src, mask=mask)
            v2 = tl.load(v_src + HALF, mask=mask)
            # The cache can exceed 2**31 elements: every cache offset is computed in int64.
            dst = (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_slot \
                + heads[:, None] * stride_c_head + pairs[None, :]
            tl.store(k_cache_ptr + dst, _to_cache(k1, k_cache_ptr, k_scale_ptr, KV_FP8,
                                                  EMULATE_FP8_CAST), mask=mask)
            tl.store(k_cache_ptr + dst + HALF, _to_cache(k2, k_cache_ptr, k_scale_ptr, KV_FP8,
                                                         EMULATE_FP8_CAST), mask=mask)
            tl.store(v_cache_ptr + dst, _to_cache(v1, v_cache_ptr, v_scale_ptr, KV_FP8,
                                                  EMULATE_FP8_CAST), mask=mask)
            tl.store(v_cache_ptr + dst + HALF, _to_cache(v2, v_cache_ptr, v_scale_ptr, KV_FP8,
                                                         EMULATE_FP8_CAST), mask=mask)


def rotary_embedding_store_kv(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    cos_cache: torch.Tensor, sin_cache: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
    q_eps: float = 1e-6, k_eps: float = 1e-6, k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate q and k as :func:`minivllm.kernels.rotary.rotary_embedding` does, store the
    rotated k and ``v`` as :func:`minivllm.kernels.kv_store.store_kv` does; return the rotated q.

    q ``[T, Hq, D]``, k and v ``[T, Hkv, D]`` (strided views of a qkv projection are fine: last
    dimension contiguous; none is modified); caches ``[num_blocks, block_size, Hkv, D]``. The
    first ``slot_mapping.shape[0]`` rows of k/v are written at their flat slots, slots ``< 0``
    (padding) never; q is rotated for all T rows. An FP8 cache needs ``k_scale``/``v_scale``
    (float32, one element, read on the device) and is written quantised. The grid depends only
    on the shapes, so the call is CUDA-graph capturable.

    Raises:
        ValueError: on unsupported dtypes/devices or mismatched shapes.
    """
    out_dtype = check_rotary_inputs(positions, q, k, cos_cache, sin_cache, q_norm_weight,
                                    k_norm_weight)
    check_cache_pair(k_cache, v_cache)
    check_kv_scales(k_cache, k_scale, v_scale)
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if k.shape[1:] != (num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k/v {tuple(k.shape)}/{tuple(v.shape)} must be [{num_tokens}, "
                         f"{num_kv_heads}, {head_dim}] to match the cache")
    if v.dtype != k.dtype or v.device != k.device or v.stride(-1) != 1:
        raise ValueError(f"v must be a {k.dtype} tensor on {k.device} with a contiguous last "
                         f"dimension, like k")
    if k_cache.device != q.device:
        raise ValueError(f"the cache is on {k_cache.device}, q on {q.device}")
    num_slots = slot_mapping.shape[0]
    if slot_mapping.dim() != 1 or num_slots > num_tokens or slot_mapping.device != q.device \
            or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 [<= {num_tokens}] on {q.device}, "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)} on "
                         f"{slot_mapping.device}")
    q_out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    kv_fp8 = is_fp8(k_cache)
    apply_norm = q_norm_weight is not None
    block_h = rotary_heads_per_program(num_tokens, num_q_heads, num_kv_heads)
    half_pad = next_pow2(head_dim // 2)
    grid = (num_tokens, cdiv(num_q_heads, block_h) + cdiv(num_kv_heads, block_h))
    _rotary_kv_store_kernel[grid](
        positions, q, k, v, q_out, k_cache, v_cache, slot_mapping,
        k_scale if kv_fp8 else k_cache, v_scale if kv_fp8 else v_cache,  # unread unless FP8
        cos_cache, sin_cache,
        q_norm_weight if apply_norm else cos_cache, k_norm_weight if apply_norm else cos_cache,
        num_slots, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cos_cache.stride(0),
        float(q_eps), float(k_eps),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, HALF_PAD=half_pad, BLOCK_H=block_h, APPLY_NORM=apply_norm,
        KV_FP8=kv_fp8, EMULATE_FP8_CAST=kv_fp8 and emulate_fp8_cast(k_cache),
        # rotary_embedding's warps: the same tile layout gives the q/k norm's sum the same
        # reduction order on the GPU, hence the same bits as the unfused kernel.
        num_warps=elementwise_num_warps(2 * block_h * half_pad),
        **NO_FP_FUSION, **pdl_options(q.device),
    )
    return q_out
