"""Gated activations.

On CUDA, ``silu(gate) * up`` is one Triton kernel; elsewhere the torch code below runs, the
reference the kernel is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.layers.norm import fused_kernels_apply


def silu_and_mul(x: torch.Tensor, *, use_triton: bool | None = None) -> torch.Tensor:
    """``silu(gate) * up`` where ``x`` is ``[..., 2 * d]`` = ``cat(gate, up)``.

    ``use_triton`` as in :func:`minivllm.layers.norm.fused_kernels_apply`.
    """
    if fused_kernels_apply(x, use_triton):
        # Imported here: only the CUDA (or forced) path needs triton.
        from minivllm.kernels.activation import silu_and_mul as silu_and_mul_triton

        return silu_and_mul_triton(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` where the input is ``[..., 2 * d]`` = ``cat(gate, up)``."""

    def forward(self, x: torch.Tensor, *, use_triton: bool | None = None) -> torch.Tensor:
        return silu_and_mul(x, use_triton=use_triton)
