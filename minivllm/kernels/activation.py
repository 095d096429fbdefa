"""Triton kernel: ``silu(gate) * up`` of a fused gate/up projection output, in one launch.

The torch layer takes three kernels (silu, and the multiply reading two strided halves);
this reads each half once and writes the product once. Numerics follow torch's: silu in
float32 rounded to the input dtype, then the product in float32 rounded to the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minivllm.kernels.common import (NO_FP_FUSION, cdiv, check_kernel_tensor,
                                     elementwise_num_warps, next_pow2)


# Columns per program: small enough that a batch-1 row of a few thousand columns still
# spreads over several programs, big enough for full-width vector loads.
_MAX_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x_row, D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    src = x_ptr + row * stride_x_row + cols
    gate = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(src + D, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # Rounded between the two steps because torch's F.silu(gate) * up rounds there too.
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * D + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` of shape ``[..., 2 * d]``, as ``[..., d]``.

    ``x`` may have a row stride larger than ``2 * d`` (last dimension contiguous); it is not
    modified. The grid depends only on the shape, so the call is CUDA-graph capturable.

    Raises:
        ValueError: on an unsupported dtype/device or an odd last dimension.
    """
    check_kernel_tensor(x, "x")
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(f"last dimension must be even (cat of gate and up), got {tuple(x.shape)}")
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows = x.reshape(-1, 2 * d)  # a view for 2-D inputs with a contiguous last dimension
    block = min(_MAX_BLOCK, next_pow2(d))
    _silu_and_mul_kernel[(rows.shape[0], cdiv(d, block))](
        rows, out, rows.stride(0), D=d, BLOCK=block, num_warps=elementwise_num_warps(2 * block),
        **NO_FP_FUSION,
    )
    return out
