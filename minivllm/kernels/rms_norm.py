"""Triton kernel: RMSNorm, optionally fused with the residual add before it, in one launch.

The torch layer (``minivllm.layers.norm``) spends ~9 elementwise kernels on one norm; at
batch-1 decode each of those costs more in launch than in work, so this does the whole row in
one program. Numerics follow the torch code step by step: the residual sum is rounded to the
input dtype, the statistics are float32, the normalised value is rounded to the input dtype and
only then multiplied by the weight (rounded to the result dtype). Only the order of the float32
sum of squares differs.

Also home to the small host checks the other elementwise kernels (rotary, activation) share.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from minivllm.kernels.common import (NO_FP_FUSION, check_kernel_tensor, elementwise_num_warps,
                                     next_pow2)

# A row lives in registers; no supported model comes near this, and beyond it a tile this
# wide would spill (or fail to compile) rather than run slowly.
MAX_ROW_ELEMENTS = 65536



@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x_row, stride_x_head, stride_r_row, stride_r_head, eps,
    NUM_HEADS: tl.constexpr, HIDDEN: tl.constexpr, BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    # One program per normalised row; a row is (token, head) so per-head q/k views with a
    # token stride larger than heads * head_dim need no copy.
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    in_dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x_row + head * stride_x_head + cols, mask=mask, other=0.0)
    dst = (row * NUM_HEADS + head) * HIDDEN + cols  # outputs are contiguous
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r_row + head * stride_r_head + cols, mask=mask,
                    other=0.0)
        # Rounded to the input dtype like torch's `x + residual`: that sum is the new residual
        # stream, and the norm below must see exactly what is stored.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(in_dtype)
        tl.store(residual_out_ptr + dst, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / HIDDEN
    normed = (xf * tl.rsqrt(variance + eps)).to(in_dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + dst, out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[rows, heads, hidden]`` view (a copy only for >3-D inputs that cannot be viewed)."""
    if t.dim() == 1:
        return t.view(1, 1, -1)
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() == 3:
        return t
    return t.reshape(-1, 1, t.shape[-1])


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension of ``x`` in one kernel launch.

    Without ``residual``: returns ``norm(x) * weight``. With it: returns
    ``(norm(x + residual) * weight, x + residual)``, both written by the same kernel. Inputs
    are never modified; outputs are new contiguous tensors shaped like ``x``. ``x`` may be a
    strided view (e.g. ``[T, heads, head_dim]`` from a split of a fused projection) as long as
    its last dimension is contiguous. The output dtype is ``promote(weight, x)``, as in torch;
    the residual sum stays in ``x.dtype``. The grid depends only on the shape, with no host
    sync, so the call is CUDA-graph capturable.

    Raises:
        ValueError: on unsupported dtypes/devices, shape mismatches, or a row too wide.
    """
    check_kernel_tensor(x, "x")
    check_kernel_tensor(weight, "weight")
    hidden = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != hidden:
        raise ValueError(f"weight must be [{hidden}] for x of shape {tuple(x.shape)}, got "
                         f"{tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x on {x.device}")
    block = next_pow2(hidden)
    if block > MAX_ROW_ELEMENTS:
        raise ValueError(f"hidden size {hidden} exceeds the kernel's {MAX_ROW_ELEMENTS}")
    if residual is not None:
        check_kernel_tensor(residual, "residual")
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x "
                             f"{tuple(x.shape)} {x.dtype} on the same device")
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    residual_out = torch.empty_like(x, memory_format=torch.contiguous_format) \
        if residual is not None else None
    if x.numel() > 0:
        x3 = _as_rows(x)
        r3 = _as_rows(residual) if residual is not None else x3
        num_rows, num_heads = x3.shape[0], x3.shape[1]
        _rms_norm_kernel[(num_rows, num_heads)](
            x3, r3, weight, out, residual_out if residual_out is not None else out,
            x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1), float(eps),
            NUM_HEADS=num_heads, HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
            num_warps=elementwise_num_warps(block),
            **NO_FP_FUSION,
        )
    return out if residual_out is None else (out, residual_out)
