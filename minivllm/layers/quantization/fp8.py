"""FP8 (e4m3) weights: ``quantization="fp8"``.

Dense checkpoints are quantised at load with per-output-channel scales and run W8A8 on
``torch._scaled_mm``: activations are quantised per token (row) on the fly, on the device, so
CUDA graphs capture it. ``_scaled_mm`` with row-wise scales needs Hopper-class GPUs (compute
capability >= 8.9) on CUDA; it also runs on CPU (torch >= 2.8), which is how CI tests this path.

At small batch (decode) the matmul is bound by reading the weights, so quantising the
activations buys nothing and costs launches: up to :data:`WEIGHT_ONLY_MAX_ROWS` rows the
Triton weight-only kernel runs instead (fp8 weights dequantised in registers, bf16 activations;
a GEMV for one row, W2's case, where only the halved weight bytes count).

Pre-quantised checkpoints (Qwen's ``*-FP8``: 128x128 ``weight_scale_inv`` blocks) keep their
codes and block scales exactly (no requantisation, so no accuracy lost at load); their matmul
is the Triton weight-only kernel on CUDA, which applies the block scales per K tile. Their
prefill therefore runs on bf16 tensor cores rather than fp8 ones (the weight bytes halve,
the FLOP rate does not double).

Elsewhere (CUDA before 8.9) the weights are dequantised to the compute dtype in the matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from minivllm.layers.dense import uses_gemv
from minivllm.layers.quantization.blockwise import BlockQuantLinearMethod
from minivllm.layers.quantization.formats import FP8_E4M3, per_token_fp8

# Rows up to which the weight-only kernel beats quantise-then-_scaled_mm on an H100 for the
# decode shapes (benchmarks/kernels.py `fp8_gemm` prints both; retune from its numbers).
WEIGHT_ONLY_MAX_ROWS = 16

# Rows the Triton activation-quantisation kernel holds in registers (as kernels.fp8_quant).
MAX_ROW_ELEMENTS = 32768

# _scaled_mm's (cuBLASLt) layout rule on CUDA: K and N multiples of 16.
_SCALED_MM_ALIGN = 16


def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8LinearMethod(BlockQuantLinearMethod):
    """float8 e4m3 weights; see the module docstring for which matmul runs where."""

    def __init__(self, device: torch.device,
                 checkpoint_block: tuple[int, int] | None = None) -> None:
        super().__init__(FP8_E4M3, device, checkpoint_block)
        self.use_scaled_mm = checkpoint_block is None and (
            device.type == "cpu" or _has_fp8_tensor_cores(device))

    def _triton_supports(self, device: torch.device) -> bool:
        # Triton converts float8e4nv in hardware from sm_89 on only.
        return _has_fp8_tensor_cores(device)

    def matmul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        rows, k = x.shape
        n = layer.weight.shape[0]
        op = self.gemv_weight(layer)
        if op is not None and uses_gemv(x, *op):
            # Batch-1 decode with per-channel scales: the base class's GEMV, one launch
            # (weight_only_gemm's split-K kernel adds a reduce and a cast: 3 launches, ~2x time).
            return super().matmul(layer, x)
        if self.use_triton and rows <= WEIGHT_ONLY_MAX_ROWS:
            return self.weight_only_gemm(layer, x)
        if self.use_scaled_mm and (self.device.type == "cpu" or (
                # cuBLASLt's row-wise scaling: bf16 output only, K and N multiples of 16.
                x.dtype == torch.bfloat16 and k % _SCALED_MM_ALIGN == 0 and n % _SCALED_MM_ALIGN == 0)):
            return scaled_mm_per_channel(x, layer.weight, layer.weight_scale)
        return super().matmul(layer, x)


def scaled_mm_per_channel(x: torch.Tensor, weight: torch.Tensor,
                          weight_scale: torch.Tensor) -> torch.Tensor:
    """W8A8: ``x`` quantised per row on the fly, times the fp8 ``weight [N, K]`` whose
    per-output-channel ``weight_scale`` is ``[N, 1]``; result in ``x``'s dtype."""
    if x.is_cuda and x.shape[1] <= MAX_ROW_ELEMENTS:
        from minivllm.kernels.fp8_quant import per_token_fp8_triton

        xq, x_scale = per_token_fp8_triton(x.contiguous())  # one launch instead of ~6 passes
    else:
        xq, x_scale = per_token_fp8(x)
    # weight.t() is the column-major [K, N] operand cuBLASLt wants, with no copy.
    return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                            out_dtype=x.dtype)
