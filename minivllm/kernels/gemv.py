"""Triton kernel: ``y = x @ W.T (+ b)`` for a few rows of ``x`` (batch-1..4 decode).

At batch 1 a linear layer is a matrix-vector product that reads the whole weight once; its
time is the weight's bytes over the memory bandwidth. cuBLAS picks latency-bound kernels for
the 4–12 MB weights of a small model (5–6 µs where the bytes take 2–4 µs on an H100), so this
kernel spreads the output features over enough programs to keep every SM streaming: each
program owns ``BLOCK_N`` output features and walks the whole reduction dimension, reading its
weight rows once for all (at most ``MAX_ROWS``) input rows.

``act="silu_and_mul"`` reads ``x`` as ``cat(gate, up)`` (width ``2 * K``) and multiplies the
weight by ``silu(gate) * up`` computed on the fly: the MLP's activation kernel disappears into
the down projection. Its numerics follow the separate activation kernel (silu rounded to the
activation dtype, then the product rounded), so outputs match the unfused path's rounding.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from minivllm.kernels.common import cdiv, num_sms, pdl_options

# Rows handled by the GEMV path: beyond this a GEMM (cuBLAS) reuses weights across rows better.
MAX_ROWS = 4
ACTIVATIONS = (None, "silu_and_mul")
# Weights the kernel dequantises in registers (with a per-output-row float32 scale).
QUANT_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.int8)


@triton.jit
def _input_chunk(x_ptr, res_ptr, norm_w_ptr, cols, mask_k, K, rstd, dtype,
                 ADD_RESIDUAL: tl.constexpr, RMS_NORM: tl.constexpr, SILU_AND_MUL: tl.constexpr):
    """Columns ``cols`` of one input row, after the fused input op, as float32.

    Every intermediate is rounded to the activation dtype where the unfused torch code rounds
    (residual sum, silu, normalised value, product with the norm weight)."""
    if SILU_AND_MUL:
        gate = tl.load(x_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + K + cols, mask=mask_k, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        xv = (act * up).to(dtype).to(tl.float32)
    else:
        xv = tl.load(x_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)
        if ADD_RESIDUAL:
            r = tl.load(res_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)
            xv = (xv + r).to(dtype).to(tl.float32)
        if RMS_NORM:
            nw = tl.load(norm_w_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)
            xv = ((xv * rstd).to(dtype).to(tl.float32) * nw).to(dtype).to(tl.float32)
    return xv


@triton.jit
def _accumulate(acc0, acc1, acc2, acc3, w, x_ptr, res_ptr, norm_w_ptr, cols, mask_k, K,
                stride_x, stride_res, rstd0, rstd1, rstd2, rstd3, dtype, M: tl.constexpr,
                ADD_RESIDUAL: tl.constexpr, RMS_NORM: tl.constexpr, SILU_AND_MUL: tl.constexpr):
    """Add one K tile of ``w * input_row`` to each row's partial sums."""
    for m in tl.static_range(M):
        if m == 0:
            rstd = rstd0
        elif m == 1:
            rstd = rstd1
        elif m == 2:
            rstd = rstd2
        else:
            rstd = rstd3
        xv = _input_chunk(x_ptr + m * stride_x, res_ptr + m * stride_res, norm_w_ptr, cols,
                          mask_k, K, rstd, dtype, ADD_RESIDUAL, RMS_NORM, SILU_AND_MUL)
        prod = w * xv[None, :]
        if m == 0:
            acc0 += prod
        elif m == 1:
            acc1 += prod
        elif m == 2:
            acc2 += prod
        else:
            acc3 += prod
    return acc0, acc1, acc2, acc3


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, res_ptr, norm_w_ptr, res_out_ptr, scale_ptr,
                 N, K, stride_x, stride_w, stride_out, stride_res, eps,
                 M: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                 SILU_AND_MUL: tl.constexpr,
                 ADD_RESIDUAL: tl.constexpr, RMS_NORM: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    rows_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rows_n < N
    offs_k = tl.arange(0, BLOCK_K)
    dtype = out_ptr.dtype.element_ty
    w_rows = w_ptr + rows_n.to(tl.int64)[:, None] * stride_w
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # The first weight tile is read before waiting for the previous kernel: weights are never
    # written by one, so this load overlaps that kernel's tail (launched with PDL).
    w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :],
                other=0.0).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    # RMSNorm statistics of each input row: every program reads the (small, L2-resident) row
    # once more for them; program 0 also stores the new residual stream (x + residual).
    rstd0 = 1.0
    rstd1 = 1.0
    rstd2 = 1.0
    rstd3 = 1.0
    if RMS_NORM:
        for m in tl.static_range(M):
            sumsq = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + offs_k
                mask_k = cols < K
                v = _input_chunk(x_ptr + m * stride_x, res_ptr + m * stride_res, norm_w_ptr,
                                 cols, mask_k, K, 1.0, dtype, ADD_RESIDUAL, False, False)
                sumsq += v * v
                if ADD_RESIDUAL:
                    if pid == 0:
                        tl.store(res_out_ptr + m * K + cols, v.to(dtype), mask=mask_k)
            rstd = tl.rsqrt(tl.sum(sumsq, axis=0) / K + eps)
            if m == 0:
                rstd0 = rstd
            elif m == 1:
                rstd1 = rstd
            elif m == 2:
                rstd2 = rstd
            else:
                rstd3 = rstd
    # One [BLOCK_N, BLOCK_K] float32 partial sum per input row; reduced over K once at the end.
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc0, acc1, acc2, acc3 = _accumulate(
        acc0, acc1, acc2, acc3, w, x_ptr, res_ptr, norm_w_ptr, offs_k, offs_k < K, K,
        stride_x, stride_res, rstd0, rstd1, rstd2, rstd3, dtype, M, ADD_RESIDUAL, RMS_NORM,
        SILU_AND_MUL)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < K
        w = tl.load(w_rows + cols[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)
        acc0, acc1, acc2, acc3 = _accumulate(
            acc0, acc1, acc2, acc3, w, x_ptr, res_ptr, norm_w_ptr, cols, mask_k, K,
            stride_x, stride_res, rstd0, rstd1, rstd2, rstd3, dtype, M, ADD_RESIDUAL,
            RMS_NORM, SILU_AND_MUL)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_SCALE:  # 8-bit weights, one scale per output row: it commutes with the sum
        row_scale = tl.load(scale_ptr + rows_n, mask=mask_n, other=0.0)
    else:
        row_scale = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    for m in tl.static_range(M):
        if m == 0:
            y = tl.sum(acc0, axis=1)
        elif m == 1:
            y = tl.sum(acc1, axis=1)
        elif m == 2:
            y = tl.sum(acc2, axis=1)
        else:
            y = tl.sum(acc3, axis=1)
        tl.store(out_ptr + m * stride_out + rows_n, (y * row_scale + bias).to(dtype), mask=mask_n)


@functools.lru_cache(maxsize=None)
def gemv_config(n: int, k: int, sms: int, weight_bytes: int = 2) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps)`` for an ``[n, k]`` weight of ``weight_bytes``-byte
    elements on ``sms`` SMs.

    Four weight rows per program: the most programs, so the most bytes in flight, which is
    what a bandwidth-bound GEMV needs. Chosen from sweeps on an H100 over the Qwen3
    0.6B/4B/8B decode shapes (benchmarks/gemv_sweep.py, results/gemv-sweep-h100-2026-11-25.md):

    - 2-byte weights: wide K tiles (16-byte loads for every thread of 8 warps) once K allows;
      at M=1 within 12 % of the best config for each shape and never slower than cuBLAS.
    - 1-byte weights (fp8/int8 with a per-row scale): small programs (2 warps on 4x512 tiles)
      for many rows, so that more of them are resident per SM; for few rows (o/down
      projections) long K tiles, so each program has more bytes in flight. 10-30 % faster than
      the 2-byte tiles on the same data (e.g. 6144x2560: 9.72 -> 7.04 µs, 1024x2048: 2.65 ->
      1.83 µs); the best swept config or within 2 % of it on 11 of 12 shapes (24576x4096:
      outside the top five, which ended at 37.1 µs against the best 36.25).
    """
    if weight_bytes == 1:
        if n >= 6144:
            return 4, 512, 2
        if n >= 4096:
            return 4, 1024, 2
        if n > 1024 or k < 2048:
            return 4, 1024, 4
        return 4, 2048, 8
    block_n = 4 if n >= 4 * sms else 2
    block_k = 1024 if k >= 2048 else 512
    num_warps = 8 if n <= 8192 else 4
    return block_n, block_k, num_warps


def _check_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    x_width: int, scale: torch.Tensor | None = None) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"gemv wants 2-D x and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    m, n = x.shape[0], weight.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"gemv handles 1..{MAX_ROWS} rows, got {m}")
    if x.shape[1] != x_width:
        raise ValueError(f"x has {x.shape[1]} columns, weight {tuple(weight.shape)} wants {x_width}")
    if scale is None and x.dtype != weight.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype, or "
                         "pass the 8-bit weight's per-row scale")
    if scale is not None and (weight.dtype not in QUANT_WEIGHT_DTYPES or scale.shape != (n,)
                              or scale.dtype != torch.float32 or not scale.is_contiguous()):
        raise ValueError(f"an 8-bit weight ({QUANT_WEIGHT_DTYPES}) needs a float32 [{n}] scale")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight need contiguous last dimensions")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{n}] of {x.dtype}")


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
            silu_and_mul: bool = False, residual: torch.Tensor | None = None,
            norm_weight: torch.Tensor | None = None, eps: float = 0.0,
            residual_out: torch.Tensor | None = None, scale: torch.Tensor | None = None,
            config: tuple[int, int, int] | None = None, pdl: bool = True) -> torch.Tensor:
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps = config or gemv_config(n, k, num_sms(x.device),
                                                        weight.element_size())
    _gemv_kernel[(cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out,
        residual if residual is not None else x,
        norm_weight if norm_weight is not None else weight,
        residual_out if residual_out is not None else out,
        scale if scale is not None else out,
        n, k, x.stride(0), weight.stride(0), out.stride(0),
        residual.stride(0) if residual is not None else 0, eps,
        M=m, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, SILU_AND_MUL=silu_and_mul,
        ADD_RESIDUAL=residual is not None, RMS_NORM=norm_weight is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        **(pdl_options(x.device) if pdl else {"USE_PDL": False}))
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         act: str | None = None, *, scale: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None, pdl: bool = True) -> torch.Tensor:
    """``act(x) @ weight.T + bias`` for ``x`` of at most ``MAX_ROWS`` rows.

    ``x``: ``[M, K]`` (``[M, 2K]`` for ``act="silu_and_mul"``), last dimension contiguous;
    ``weight``: ``[N, K]`` contiguous rows, in ``x``'s dtype, or 8-bit (fp8 e4m3 / int8) with
    ``scale`` its float32 ``[N]`` per-row scales (read in 8 bits, dequantised in registers:
    half the bytes of bf16, which is what batch-1 decode time is). The launch depends only on the shapes, so the
    call is CUDA-graph capturable. ``config`` overrides :func:`gemv_config`; ``pdl=False``
    launches without programmatic dependent launch (both for benchmarks).

    Raises:
        ValueError: on more than ``MAX_ROWS`` rows, mismatched shapes or dtypes, or an
        unknown ``act``.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    k = weight.shape[-1]
    _check_operands(x, weight, bias, 2 * k if act == "silu_and_mul" else k, scale)
    return _launch(x, weight, bias, silu_and_mul=act == "silu_and_mul", scale=scale,
                   config=config, pdl=pdl)


def rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                  eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual) @ weight.T + bias, x + residual)`` in one launch.

    The pre-norm of a transformer block folded into the matmul after it; without
    ``residual`` the norm is of ``x`` and ``x`` is returned as the residual stream.
    Numerics follow :mod:`minivllm.kernels.rms_norm` then :func:`gemv`.

    Raises:
        ValueError: as :func:`gemv`, or on a residual / norm weight of the wrong shape.
    """
    k = weight.shape[-1]
    _check_operands(x, weight, bias, k, scale)
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.stride(1) != 1):
        raise ValueError(f"residual must match x {tuple(x.shape)} / {x.dtype}")
    if norm_weight.shape != (k,):
        raise ValueError(f"norm weight must be [{k}], got {tuple(norm_weight.shape)}")
    residual_out = torch.empty_like(x) if residual is not None else None
    out = _launch(x, weight, bias, residual=residual, norm_weight=norm_weight, eps=eps,
                  residual_out=residual_out, scale=scale)
    return out, (residual_out if residual_out is not None else x)
