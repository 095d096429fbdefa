"""Triton kernel: rotary embedding of q and k in one launch, optionally after per-head RMSNorm.

HF "rotate half" layout: the first and second halves of a head are the two coordinates of
each rotated pair. The torch layer spends ~20 kernels on this (gather cos/sin, casts, four
multiplies, add/sub, cat, cast, for q and for k) and Qwen3's q/k norms ~18 more; here each
program loads a few heads of one token once, normalises them if asked, rotates them and stores
them. Numerics follow the torch code: norm statistics in float32, the normalised value rounded
to the input dtype and multiplied by the weight (rounded to the result dtype), the rotation in
float32 against the float32 cos/sin cache, rounded to the result dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minivllm.kernels.common import (NO_FP_FUSION, cdiv, check_kernel_tensor,
                                     elementwise_num_warps, next_pow2, pdl_options)
from minivllm.kernels.pdl import pdl_enter


# Launches of up to this many tokens get one head per program (see rotary_heads_per_program).
_SMALL_BATCH_TOKENS = 16
_HEADS_PER_PROGRAM_LARGE = 4


@triton.jit
def load_cos_sin(positions_ptr, cos_ptr, sin_ptr, token, stride_cache_pos,
                 HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr):
    """float32 cos and sin of ``token``'s position, ``[1, HALF_PAD]`` (zero past D/2)."""
    pos = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, HALF_PAD)
    pair_mask = pairs < HEAD_DIM // 2
    cos = tl.load(cos_ptr + pos * stride_cache_pos + pairs, mask=pair_mask, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cache_pos + pairs, mask=pair_mask, other=0.0)
    return cos.to(tl.float32)[None, :], sin.to(tl.float32)[None, :]


@triton.jit
def norm_rotate_heads(
    src_ptr, w_ptr, token, first_head, stride_tok, stride_head, eps, cos, sin,
    OUT_DTYPE: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr, APPLY_NORM: tl.constexpr,
):
    """Heads ``first_head + [0, BLOCK_H)`` of ``token``: loaded, normalised if asked, rotated
    and rounded to ``OUT_DTYPE``. Returns the two halves ``[BLOCK_H, HALF_PAD]`` and their mask
    (heads past ``NUM_HEADS`` and pairs past D/2 are masked out)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    heads = first_head + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, HALF_PAD)
    pair_mask = pairs < HALF
    mask = (heads[:, None] < NUM_HEADS) & pair_mask[None, :]
    src = src_ptr + token * stride_tok + heads[:, None] * stride_head + pairs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    if APPLY_NORM:
        in_dtype = src_ptr.dtype.element_ty
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        variance = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM
        inv_rms = tl.rsqrt(variance + eps)[:, None]
        w1 = tl.load(w_ptr + pairs, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + pairs, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
        # The same two roundings as the unfused torch norm: to the input dtype, then the
        # weight product to the result dtype; the rotation then starts from that value.
        x1 = ((x1 * inv_rms).to(in_dtype).to(tl.float32) * w1).to(OUT_DTYPE)
        x2 = ((x2 * inv_rms).to(in_dtype).to(tl.float32) * w2).to(OUT_DTYPE)
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    return out1.to(OUT_DTYPE), out2.to(OUT_DTYPE), mask


@triton.jit
def _norm_rotate_store_heads(
    src_ptr, dst_ptr, w_ptr, token, first_head, stride_tok, stride_head, eps, cos, sin,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr, APPLY_NORM: tl.constexpr,
):
    out1, out2, mask = norm_rotate_heads(
        src_ptr, w_ptr, token, first_head, stride_tok, stride_head, eps, cos, sin,
        dst_ptr.dtype.element_ty, NUM_HEADS, HEAD_DIM, HALF_PAD, BLOCK_H, APPLY_NORM)
    heads = first_head + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, HALF_PAD)
    dst = dst_ptr + (token * NUM_HEADS + heads[:, None]) * HEAD_DIM + pairs[None, :]
    tl.store(dst, out1, mask=mask)
    tl.store(dst + HEAD_DIM // 2, out2, mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, q_w_ptr, k_w_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cache_pos, q_eps, k_eps,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr, APPLY_NORM: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)  # launched early (see pdl_options): wait for the qkv projection
    # Grid: (token, head block); the first ceil(Hq / BLOCK_H) head blocks are q's, the rest k's.
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    Q_BLOCKS: tl.constexpr = (NUM_Q_HEADS + BLOCK_H - 1) // BLOCK_H
    cos, sin = load_cos_sin(positions_ptr, cos_ptr, sin_ptr, token, stride_cache_pos, HEAD_DIM,
                            HALF_PAD)
    if head_block < Q_BLOCKS:
        _norm_rotate_store_heads(q_ptr, q_out_ptr, q_w_ptr, token, head_block * BLOCK_H,
                                 stride_q_tok, stride_q_head, q_eps, cos, sin, NUM_Q_HEADS,
                                 HEAD_DIM, HALF_PAD, BLOCK_H, APPLY_NORM)
    else:
        _norm_rotate_store_heads(k_ptr, k_out_ptr, k_w_ptr, token,
                                 (head_block - Q_BLOCKS) * BLOCK_H, stride_k_tok, stride_k_head,
                                 k_eps, cos, sin, NUM_K_HEADS, HEAD_DIM, HALF_PAD, BLOCK_H,
                                 APPLY_NORM)


def _check_norm_weight(w: torch.Tensor, name: str, head_dim: int, device: torch.device) -> None:
    check_kernel_tensor(w, name)
    if w.shape != (head_dim,) or w.device != device:
        raise ValueError(f"{name} must be [{head_dim}] on {device}, got {tuple(w.shape)} on "
                         f"{w.device}")


def check_rotary_inputs(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
    sin_cache: torch.Tensor, q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
) -> torch.dtype:
    """Validate the inputs of a rotary launch (see :func:`rotary_embedding`); return the dtype
    of the rotated q and k.

    Raises:
        ValueError: on unsupported dtypes/devices or mismatched shapes.
    """
    check_kernel_tensor(q, "q")
    check_kernel_tensor(k, "k")
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must be [T, heads, head_dim] with the same T and head_dim, "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"q and k differ in dtype/device: {q.dtype}/{q.device} vs "
                         f"{k.dtype}/{k.device}")
    num_tokens, _, head_dim = q.shape
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even for rotary, got {head_dim}")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int32, torch.int64) \
            or positions.device != q.device:
        raise ValueError(f"positions must be int32/int64 [{num_tokens}] on {q.device}, got "
                         f"{positions.dtype} {tuple(positions.shape)} on {positions.device}")
    for name, cache in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        check_kernel_tensor(cache, name)
        if cache.dim() != 2 or cache.shape[1] != head_dim // 2 or cache.device != q.device:
            raise ValueError(f"{name} must be [max_position, {head_dim // 2}] on {q.device}, got "
                             f"{tuple(cache.shape)} on {cache.device}")
    if cos_cache.shape != sin_cache.shape or cos_cache.stride() != sin_cache.stride():
        raise ValueError("cos_cache and sin_cache must have the same shape and strides")
    apply_norm = q_norm_weight is not None
    if apply_norm != (k_norm_weight is not None):
        raise ValueError("pass both q_norm_weight and k_norm_weight, or neither")
    out_dtype = q.dtype
    if apply_norm:
        _check_norm_weight(q_norm_weight, "q_norm_weight", head_dim, q.device)
        _check_norm_weight(k_norm_weight, "k_norm_weight", head_dim, q.device)
        if q_norm_weight.dtype != k_norm_weight.dtype:
            raise ValueError("q_norm_weight and k_norm_weight must share a dtype")
        out_dtype = torch.promote_types(q_norm_weight.dtype, q.dtype)
    return out_dtype


def rotary_heads_per_program(num_tokens: int, num_q_heads: int, num_k_heads: int) -> int:
    """Heads one program handles: 1 for decode-sized launches (more programs in flight, lower
    latency), a few for prefill-sized ones (each program moves a useful amount of data)."""
    if num_tokens <= _SMALL_BATCH_TOKENS:
        return 1
    return min(_HEADS_PER_PROGRAM_LARGE, next_pow2(max(num_q_heads, num_k_heads)))


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
    sin_cache: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None, q_eps: float = 1e-6, k_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[T, Hq, D]`` and k ``[T, Hk, D]`` by ``positions`` ``[T]`` in one launch.

    ``cos_cache``/``sin_cache`` are ``[max_position, D/2]`` (float32 in the layer); every
    position must be in ``[0, max_position)`` (not checked on the device: that would need a
    host sync). q and k may be strided views, such as the q/k parts of a fused qkv projection
    split and reshaped, as long as their last dimension is contiguous; they are not modified.
    Returns new contiguous ``(q, k)``.

    With ``q_norm_weight``/``k_norm_weight`` (both or neither), each head is first
    RMS-normalised over D with its weight and eps (Qwen3's q/k norm), in the same launch; the
    outputs then have dtype ``promote(weight, input)``, as the unfused torch layers give.
    The grid depends only on the shapes, so the call is CUDA-graph capturable.

    Raises:
        ValueError: on unsupported dtypes/devices or mismatched shapes.
    """
    out_dtype = check_rotary_inputs(positions, q, k, cos_cache, sin_cache, q_norm_weight,
                                    k_norm_weight)
    apply_norm = q_norm_weight is not None
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    q_out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=out_dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    block_h = rotary_heads_per_program(num_tokens, num_q_heads, num_k_heads)
    half_pad = next_pow2(head_dim // 2)
    grid = (num_tokens, cdiv(num_q_heads, block_h) + cdiv(num_k_heads, block_h))
    _rotary_kernel[grid](
        positions, q, k, q_out, k_out, cos_cache, sin_cache,
        q_norm_weight if apply_norm else cos_cache, k_norm_weight if apply_norm else cos_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_cache.stride(0),
        float(q_eps), float(k_eps),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HEAD_DIM=head_dim,
        HALF_PAD=half_pad, BLOCK_H=block_h, APPLY_NORM=apply_norm,
        num_warps=elementwise_num_warps(2 * block_h * half_pad),
        **NO_FP_FUSION, **pdl_options(q.device),
    )
    return q_out, k_out
