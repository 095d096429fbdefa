"""The dense (unquantised) matmul every linear layer ends in: ``x @ W.T + b``.

One row on CUDA — batch-1 decode, where the matmul is a weight read — takes the GEMV
(:mod:`minivllm.layers.gemv_dispatch`: Triton, or the CUDA C++ op where enabled), which keeps
more bytes in flight than cuBLAS's kernels for these shapes; everything else is ``F.linear``. Outputs agree to float32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minivllm.layers import gemv_dispatch
from minivllm.layers.norm import fused_kernels_apply

_GEMV_DTYPES = (torch.float16, torch.bfloat16)
# 8-bit weights the GEMV reads with a per-output-row scale (see layers/gemv_dispatch.py).
_GEMV_QUANT_DTYPES = (torch.float8_e4m3fn, torch.int8)


def uses_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
    """Whether the GEMV kernel runs for these operands: one CUDA row, a contiguous weight in
    ``x``'s dtype, or 8-bit with per-row ``scale``."""
    weight_ok = (weight.dtype == x.dtype if scale is None
                 else weight.dtype in _GEMV_QUANT_DTYPES)
    return (x.dim() == 2 and x.shape[0] == 1 and x.dtype in _GEMV_DTYPES and weight_ok
            and weight.is_contiguous() and x.stride(-1) == 1 and fused_kernels_apply(x))


def dense_linear(x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, by the GEMV kernel for a single CUDA row."""
    if uses_gemv(x, weight):
        return gemv_dispatch.gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None,
                        scale: torch.Tensor | None = None) -> torch.Tensor:
    """``dense_linear(silu(gate) * up, weight, bias)`` for ``x = cat(gate, up)``.

    On the GEMV path the activation is computed inside the matmul (one kernel, and the
    activation never goes through memory); otherwise the activation kernel runs first.
    """
    if uses_gemv(x, weight, scale):
        return gemv_dispatch.gemv(x, weight, bias, act="silu_and_mul", scale=scale)
    if scale is not None:
        raise ValueError("an 8-bit weight runs here only on the GEMV path")
    from minivllm.layers.activation import silu_and_mul

    return dense_linear(silu_and_mul(x), weight, bias)
