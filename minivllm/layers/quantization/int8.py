"""INT8 weight-only: ``quantization="int8"``, for GPUs without fp8 tensor cores.

Dense checkpoints are quantised at load with symmetric per-output-channel scales (codes in
[-127, 127]); GGUF ``Q8_0`` weights keep their own 1x32 block scales (see ``gguf_convert``).
Activations stay in the compute dtype: the gain is reading half (vs bf16) of the weight bytes.

Matmul: the Triton dequant-in-GEMM kernel on CUDA; on CPU ``torch._weight_int8pack_mm`` for
per-channel scales (int8 weights, scales applied to the output), else the dequantising fallback.
"""

from __future__ import annotations

import torch
from torch import nn

from minivllm.layers.quantization.blockwise import BlockQuantLinearMethod
from minivllm.layers.quantization.formats import INT8


class Int8LinearMethod(BlockQuantLinearMethod):
    """int8 weights with float32 scales; see the module docstring."""

    def __init__(self, device: torch.device,
                 checkpoint_block: tuple[int, int] | None = None) -> None:
        super().__init__(INT8, device, checkpoint_block)

    def matmul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        per_channel = layer.weight_scale.shape[1] == 1 and layer.scale_block[0] == 1
        # A GEMV-style CPU kernel: it beats dequantise-then-BLAS only at decode batch sizes.
        if not self.use_triton and per_channel and x.device.type == "cpu" and x.shape[0] <= 16:
            scales = layer.weight_scale.view(-1).to(x.dtype)
            return torch._weight_int8pack_mm(x.contiguous(), layer.weight, scales)
        return super().matmul(layer, x)
