"""Triton kernel: dynamic per-token (per-row) float8 e4m3 quantisation of activations.

The torch version (``layers/quantization/formats.per_token_fp8``) makes several passes over a
float32 copy of the activations; at prefill (thousands of rows) that costs about as much as the
fp8 GEMM it feeds. Here one program reads its row once (kept in registers), takes the absmax,
and writes the codes and the row's scale. Same arithmetic as the torch version: float32 absmax,
``scale = absmax / 448``, ``x / scale`` clamped to ±448, cast with round-to-nearest-even.

Tested on the GPU only (tests/gpu/test_quant_weights.py, bit-exact against torch): Triton 3.9's
interpreter rounds float32 → float8 wrongly (e.g. -125.4 → -64), so CPU runs use the torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minivllm.kernels.common import next_pow2

FP8_MAX = 448.0
MIN_AMAX = 1e-12  # as formats._MIN_AMAX: an all-zero row gets a tiny positive scale
MAX_ROW_ELEMENTS = 32768  # a row lives in registers; hidden/intermediate sizes stay below


@triton.jit
def _per_token_fp8_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, fp8_max, min_amax,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), min_amax)
    # IEEE-rounded divisions (Triton's `/` on float32 is approximate): bit-exact with torch.
    scale = tl.div_rn(amax, fp8_max)
    q = tl.minimum(tl.maximum(tl.div_rn(x, scale), -fp8_max), fp8_max)
    # Stored through a uint8 view: Triton 3.9's interpreter cannot store float8 directly.
    tl.store(q_ptr + row * K + cols, q.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=mask)
    tl.store(scale_ptr + row, scale)


def per_token_fp8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` → ``(q [M, K] float8_e4m3fn, scale [M, 1] float32)``, one launch.

    Raises:
        ValueError: not 2-D, or a row too long to hold in registers.
    """
    if x.dim() != 2 or x.shape[1] > MAX_ROW_ELEMENTS or x.stride(1) != 1:
        raise ValueError(f"expected a row-contiguous [M, K <= {MAX_ROW_ELEMENTS}] tensor, "
                         f"got {tuple(x.shape)} with strides {x.stride()}")
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.uint8, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = next_pow2(k)
        # The constants go in as float32 arguments (Triton jit code reads no plain globals).
        _per_token_fp8_kernel[(m,)](x, q, scale, k, x.stride(0), FP8_MAX, MIN_AMAX, BLOCK=block,
                                    num_warps=min(16, max(4, block // 1024)))
    return q.view(torch.float8_e4m3fn), scale
