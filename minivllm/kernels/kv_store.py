"""Triton kernel: scatter this step's new K/V rows into the paged cache at ``slot_mapping``.

An FP8 (e4m3) cache is written quantised: ``sat(x / scale)`` with the layer's K and V scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minivllm.attention.kv_cache import is_fp8
from minivllm.kernels.common import check_cache_pair, check_kv_scales, next_pow2, pdl_options
from minivllm.kernels.fp8 import emulate_fp8_cast, quantize_fp8_e4m3
from minivllm.kernels.pdl import pdl_enter


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_block, stride_c_slot, stride_c_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
    KV_FP8: tl.constexpr, EMULATE_FP8_CAST: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    # One program per token: one row of Hkv * D elements for K and one for V.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:  # padding token: its slot must never be touched
        return
    # The cache can exceed 2**31 elements: every cache offset is computed in int64.
    block = slot // BLOCK_SIZE
    offset_in_block = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, DIM_PAD)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)

    k = tl.load(k_ptr + token * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :],
                mask=mask)
    v = tl.load(v_ptr + token * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :],
                mask=mask)
    dst = block * stride_c_block + offset_in_block * stride_c_slot \
        + heads[:, None] * stride_c_head + dims[None, :]
    if KV_FP8:
        k_out = quantize_fp8_e4m3(k, tl.load(k_scale_ptr), EMULATE_FP8_CAST)
        v_out = quantize_fp8_e4m3(v, tl.load(v_scale_ptr), EMULATE_FP8_CAST)
    else:
        k_out = k.to(k_cache_ptr.dtype.element_ty)
        v_out = v.to(v_cache_ptr.dtype.element_ty)
    tl.store(k_cache_ptr + dst, k_out, mask=mask)
    tl.store(v_cache_ptr + dst, v_out, mask=mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write ``k``/``v`` rows (``[num_tokens, num_kv_heads, head_dim]``) at their flat slots.

    Slots ``< 0`` are padding and left untouched. Only ``slot_mapping.shape[0]`` rows are
    stored, so ``k``/``v`` may carry extra (padding) rows. The launch grid depends only on
    the number of tokens, which keeps the call CUDA-graph capturable. An FP8 cache needs
    ``k_scale``/``v_scale`` (float32, one element, read on the device).
    """
    check_cache_pair(k_cache, v_cache)
    kv_fp8 = is_fp8(k_cache)
    check_kv_scales(k_cache, k_scale, v_scale)
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if k.shape[1:] != (num_kv_heads, head_dim) or v.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"k/v rows {tuple(k.shape[1:])}/{tuple(v.shape[1:])} do not match the cache's "
            f"(num_kv_heads, head_dim) = {(num_kv_heads, head_dim)}")
    if k.shape[0] < num_tokens or v.shape[0] < num_tokens:
        raise ValueError(f"slot_mapping has {num_tokens} entries but k/v only "
                         f"{k.shape[0]}/{v.shape[0]} rows")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v need a contiguous last (head_dim) dimension")
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k_scale if kv_fp8 else k_cache, v_scale if kv_fp8 else v_cache,  # unread unless FP8
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        HEADS_PAD=next_pow2(num_kv_heads), DIM_PAD=next_pow2(head_dim),
        KV_FP8=kv_fp8, EMULATE_FP8_CAST=kv_fp8 and emulate_fp8_cast(k_cache),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 2, **pdl_options(k.device),
    )
