"""Triton kernel: ``x @ W^T`` with 8-bit weights (float8 e4m3 or int8) dequantised in registers.

Weight-only: activations stay in the compute dtype and are never quantised. Each K tile of the
weight is loaded as 8-bit codes (half the bytes of bf16 — the whole point at decode, where the
matmul only streams weights), converted exactly to the activation dtype (every e4m3 and int8
value is a bf16/fp16 value), multiplied on the tensor cores with float32 accumulation, and the
block scale applied to the tile's partial sum. Per-output-channel scales are applied once, at
the end.

Scales: ``scale[n // row_block, k // col_block]`` (see ``layers/quantization/formats.py``);
``col_block`` a power of two >= 16 (it bounds the K tile) or ``>= K`` (per channel).

One row (batch-1 decode, W2) takes a GEMV kernel instead: no tensor cores, no 16-row tile
padding, no operand layout shuffles — products summed along K in registers.

Small M (decode) may have too few output tiles to occupy every SM; then K is split over
programs that each write a float32 partial, and one ``sum`` adds them (deterministic, unlike
atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minivllm.kernels.common import cdiv, next_pow2, num_sms

SUPPORTED_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.int8)
SUPPORTED_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _weight_quant_gemm_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_sn, stride_om, stride_split,
    ROW_BLOCK: tl.constexpr, COL_BLOCK: tl.constexpr, PER_CHANNEL: tl.constexpr,
    WEIGHT_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    act_dtype = x_ptr.dtype.element_ty
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None],
                    mask=mask_n[None, :] & mask_k[:, None], other=0)
        if WEIGHT_FP8:  # loaded as raw bytes (a masked fp8 load has no `other` in Triton 3.9)
            w = w.to(tl.float8e4nv, bitcast=True)
        part = tl.dot(x, w.to(act_dtype), input_precision=DOT_PRECISION)
        if PER_CHANNEL:
            acc += part
        else:
            # BLOCK_K divides COL_BLOCK, so the whole tile shares one scale column.
            s = tl.load(s_ptr + (offs_n // ROW_BLOCK) * stride_sn + k0 // COL_BLOCK,
                        mask=mask_n, other=0.0)
            acc += part * s[None, :]
    if PER_CHANNEL:
        s = tl.load(s_ptr + (offs_n // ROW_BLOCK) * stride_sn, mask=mask_n, other=0.0)
        acc = acc * s[None, :]
    out = out_ptr + pid_k * stride_split + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# At decode, at most this many K splits: each split costs a float32 partial and the sum that
# adds them (two more small kernels), worth it only while the output tiles alone leave SMs idle.
MAX_DECODE_SPLIT_K = 4


@triton.jit
def _weight_quant_gemv_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr,
    N, K, k_per_split,
    stride_wn, stride_sn, stride_split,
    ROW_BLOCK: tl.constexpr, COL_BLOCK: tl.constexpr, PER_CHANNEL: tl.constexpr,
    WEIGHT_FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0)
        if WEIGHT_FP8:
            w = w.to(tl.float8e4nv, bitcast=True)
        part = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if PER_CHANNEL:
            acc += part
        else:
            s = tl.load(s_ptr + (offs_n // ROW_BLOCK) * stride_sn + k0 // COL_BLOCK,
                        mask=mask_n, other=0.0)
            acc += part * s
    if PER_CHANNEL:
        acc = acc * tl.load(s_ptr + (offs_n // ROW_BLOCK) * stride_sn, mask=mask_n, other=0.0)
    tl.store(out_ptr + pid_k * stride_split + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


# GEMV tile: 16 output rows x 512 K per step (8 KB of fp8/int8 weights in flight per stage).
GEMV_BLOCK_N, GEMV_BLOCK_K = 16, 512


def _launch_config(m: int, n: int, k: int, col_block: int, per_channel: bool,
                   device: torch.device) -> tuple[int, int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, split_k, num_warps, num_stages)`` for one shape.

    Fixed heuristics, no autotuning: the first call may happen inside CUDA-graph capture.
    Decode (m <= 16) streams the weights once: narrow output tiles give many programs, deep
    K tiles and stages keep bytes in flight; K is split only when the tiles fill less than one
    wave of SMs (Qwen3-4B's o/down projections: N = 2560).
    """
    if m <= 16:
        block_m, block_n, block_k, warps, stages = 16, 32, 256, 4, 4
    elif m <= 64:
        block_m, block_n, block_k, warps, stages = next_pow2(m), 128, 128, 4, 3
    else:
        block_m, block_n, block_k, warps, stages = 128, 128, 64, 8, 3
    if not per_channel:
        block_k = min(block_k, col_block)
    split = 1
    n_tiles = cdiv(n, block_n)
    sms = num_sms(device)
    if m <= 16 and n_tiles < sms:
        split = max(1, min(MAX_DECODE_SPLIT_K, cdiv(k, block_k), cdiv(sms, n_tiles)))
    return block_m, block_n, block_k, split, warps, stages


def weight_quant_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      row_block: int, col_block: int, kernel: str = "auto") -> torch.Tensor:
    """``x [M, K] @ dequant(weight [N, K], scale)^T`` → ``[M, N]`` in ``x``'s dtype.

    ``kernel``: ``"auto"`` (GEMV for one row, else the tensor-core kernel), ``"gemv"`` (one
    row only) or ``"dot"`` — the last two for benchmarks and tests.

    Raises:
        ValueError: unsupported dtypes, shapes or scale blocks.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_WEIGHT_DTYPES or x.dtype not in SUPPORTED_ACT_DTYPES:
        raise ValueError(f"unsupported dtypes: x {x.dtype}, weight {weight.dtype}")
    m, k = x.shape
    n = weight.shape[0]
    per_channel = col_block >= k
    if not per_channel and (col_block < 16 or col_block & (col_block - 1)):
        raise ValueError(f"column block {col_block} must be a power of two >= 16 (or cover K)")
    if scale.dtype != torch.float32 or scale.shape != (cdiv(n, row_block), cdiv(k, col_block)):
        raise ValueError(f"scale must be float32 [{cdiv(n, row_block)}, {cdiv(k, col_block)}], "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    x = x.contiguous()
    weight_fp8 = weight.dtype == torch.float8_e4m3fn
    weight = weight.contiguous().view(torch.uint8) if weight_fp8 else weight.contiguous()
    scale = scale.contiguous()
    if kernel == "gemv" or (kernel == "auto" and m == 1):
        if m != 1:
            raise ValueError(f"the GEMV kernel takes one row, got {m}")
        return _gemv(x, weight, scale, row_block, col_block, per_channel, weight_fp8)
    block_m, block_n, block_k, split, warps, stages = _launch_config(
        m, n, k, col_block, per_channel, x.device)
    k_per_split = cdiv(cdiv(k, block_k), split) * block_k
    split = cdiv(k, k_per_split)
    if split == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        stride_split = 0
    else:
        out = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        stride_split = out.stride(0)
    grid = (cdiv(m, block_m), cdiv(n, block_n), split)
    _weight_quant_gemm_kernel[grid](
        x, weight, scale, out, m, n, k, k_per_split,
        x.stride(0), weight.stride(0), scale.stride(0), out.stride(-2), stride_split,
        ROW_BLOCK=row_block, COL_BLOCK=1 if per_channel else col_block, PER_CHANNEL=per_channel,
        WEIGHT_FP8=weight_fp8,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,  # fp32: no silent TF32
        num_warps=warps, num_stages=stages)
    return out if split == 1 else out.sum(0).to(x.dtype)


def _gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, row_block: int,
          col_block: int, per_channel: bool, weight_fp8: bool) -> torch.Tensor:
    """One row: ``x [1, K]``; ``weight`` already contiguous (fp8 viewed as uint8)."""
    n, k = weight.shape
    block_k = GEMV_BLOCK_K if per_channel else min(GEMV_BLOCK_K, col_block)
    n_tiles = cdiv(n, GEMV_BLOCK_N)
    sms = num_sms(x.device)
    split = 1
    if n_tiles < 2 * sms:  # GEMV programs are short: aim for two waves
        split = max(1, min(MAX_DECODE_SPLIT_K, cdiv(k, block_k), cdiv(2 * sms, n_tiles)))
    k_per_split = cdiv(cdiv(k, block_k), split) * block_k
    split = cdiv(k, k_per_split)
    if split == 1:
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split, 1, n, dtype=torch.float32, device=x.device)
    _weight_quant_gemv_kernel[(n_tiles, split)](
        x, weight, scale, out, n, k, k_per_split, weight.stride(0), scale.stride(0),
        out.stride(0) if split > 1 else 0,
        ROW_BLOCK=row_block, COL_BLOCK=1 if per_channel else col_block, PER_CHANNEL=per_channel,
        WEIGHT_FP8=weight_fp8, BLOCK_N=GEMV_BLOCK_N, BLOCK_K=block_k, num_warps=4, num_stages=4)
    return out if split == 1 else out.sum(0).to(x.dtype)
