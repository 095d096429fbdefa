"""RMSNorm, computed in float32 for stability whatever the activation dtype.

On CUDA the norm (and the residual add before it) runs as one Triton kernel; elsewhere the
torch code below runs, and it is the reference the kernel is tested against.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_kernels_apply(t: torch.Tensor, use_triton: bool | None = None) -> bool:
    """Whether a layer should run its Triton kernel for input ``t``.

    ``None`` (the layers' default) means: on CUDA when triton is installed, never on CPU, so
    the CPU path stays the exact torch reference even when ``TRITON_INTERPRET=1`` is set for
    the attention kernels. ``True`` forces the kernel (tests run it on CPU under the
    interpreter), ``False`` forces torch (e.g. to compare the two on a GPU).
    """
    if use_triton is not None:
        return use_triton
    return t.is_cuda and _triton_importable()


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference RMSNorm: float32 statistics, rounded to ``x.dtype`` before the weight."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    *, use_triton: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Without ``residual``: ``norm(x)``. With it: ``(norm(x + residual), x + residual)``.

    ``use_triton`` as in :func:`fused_kernels_apply`.
    """
    if fused_kernels_apply(x, use_triton):
        # Imported here: only the CUDA (or forced) path needs triton.
        from minivllm.kernels.rms_norm import rms_norm as rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    if residual is None:
        return rms_norm_torch(x, weight, eps)
    x = x + residual
    return rms_norm_torch(x, weight, eps), x


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``; optionally fuses the residual add that precedes it."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, *,
        use_triton: bool | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: ``norm(x)``. With it: ``(norm(x + residual), x + residual)``."""
        return rms_norm(x, self.weight, self.eps, residual, use_triton=use_triton)
