"""Weights stored in 8 bits with float32 block scales: the shared part of the fp8/int8 methods.

Per-layer state: ``weight`` (``[N, K]`` float8 e4m3 or int8), ``weight_scale`` (float32, one
per ``row_block x col_block`` block, see :mod:`.formats`) and ``scale_block`` (the two sizes).

Two ways in:
- a dense checkpoint (bf16/fp16/fp32) quantised at load: per-output-channel scales
  (``1 x K``), the scale is derived from the weight rows as they load;
- a pre-quantised checkpoint (``checkpoint_block`` set): its 8-bit codes and block scales are
  kept as they are. When a tensor-parallel or fused-part boundary cuts through a row block,
  the scales are stored per row (each block scale repeated over its rows, the same numbers)
  rather than refused.

The matmul: the subclass's fast path where there is one, else the Triton dequant-in-GEMM kernel
on CUDA, else (CPU) the weight dequantised to the compute dtype and ``F.linear`` — slower, but
the same numbers, never a silently different model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.layers import gemv_dispatch
from minivllm.layers.dense import uses_gemv
from minivllm.layers.quantization.base import LinearMethod, LoadSpan, RowPart, read_span
from minivllm.layers.quantization.formats import QuantFormat, dequantize_blockwise, quantize_blockwise, scale_grid_shape
from minivllm.layers.weight_loading import WeightSource


class BlockQuantLinearMethod(LinearMethod):
    """8-bit weight codes with block scales; see the module docstring."""

    quantized = True

    def __init__(self, fmt: QuantFormat, device: torch.device,
                 checkpoint_block: tuple[int, int] | None = None) -> None:
        """``checkpoint_block``: ``(rows, cols)`` of the checkpoint's scale blocks when its
        weights are pre-quantised; ``None`` to quantise dense weights per output channel."""
        self.fmt = fmt
        self.device = device
        self.checkpoint_block = checkpoint_block
        self.derived_params = frozenset() if checkpoint_block else frozenset({"weight_scale"})
        self.use_triton = device.type == "cuda" and self._triton_supports(device)

    def _triton_supports(self, device: torch.device) -> bool:
        """Whether the Triton dequant-in-GEMM kernel can read this format on ``device``."""
        return True

    def describe(self) -> str:
        """One line for the log: format and scale granularity."""
        how = ("per-output-channel scales, quantised at load" if self.checkpoint_block is None
               else f"{self.checkpoint_block[0]}x{self.checkpoint_block[1]} block scales from the checkpoint")
        return f"{self.fmt.name} weights, {how}"

    # ---- weights ---------------------------------------------------------------------------
    def create_weights(self, layer: nn.Module, out_features: int, in_features: int,
                       row_parts: list[RowPart], in_start: int) -> None:
        if self.checkpoint_block is None:
            row_block, col_block = 1, in_features
        else:
            block_rows, col_block = self.checkpoint_block
            if in_start % col_block:
                raise ValueError(
                    f"tensor parallelism splits the input features at column {in_start}, inside a "
                    f"{col_block}-column quantisation block of the checkpoint; use a tensor-parallel "
                    f"size that keeps shards whole blocks")
            aligned = all(p.src_start % block_rows == 0 and p.local_size % block_rows == 0
                          for p in row_parts)
            row_block = block_rows if aligned else 1
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=self.fmt.dtype),
                                    requires_grad=False)
        grid = scale_grid_shape(out_features, in_features, row_block, col_block)
        # NaN until loaded: a scale the checkpoint lacked can never pass for a real one.
        layer.weight_scale = nn.Parameter(torch.full(grid, float("nan"), dtype=torch.float32),
                                          requires_grad=False)
        layer.scale_block = (row_block, col_block)

    def checkpoint_shape(self, param_name: str, rows: int, cols: int) -> tuple[int, ...]:
        if param_name == "weight":
            return rows, cols
        if param_name == "weight_scale" and self.checkpoint_block is not None:
            return scale_grid_shape(rows, cols, *self.checkpoint_block)
        raise ValueError(f"unexpected checkpoint tensor {param_name!r} for {self.describe()}")

    def load(self, layer: nn.Module, param_name: str, src: WeightSource, span: LoadSpan) -> None:
        if param_name == "weight_scale":
            self._load_checkpoint_scale(layer, src, span)
            return
        data = read_span(src, span)
        if data.dtype == self.fmt.dtype:
            if self.checkpoint_block is None:
                raise ValueError(f"checkpoint weight is already {data.dtype} but config.json has no "
                                 f"quantization_config with its scales")
            layer.weight.data.narrow(0, span.dst_row, span.num_rows).copy_(data)
            return
        if not data.is_floating_point() or data.dtype.itemsize == 1:
            raise ValueError(f"cannot load a {data.dtype} checkpoint weight as {self.describe()}")
        row_block, col_block = layer.scale_block
        q, scale = quantize_blockwise(data.to(self.device), self.fmt, row_block, col_block)
        layer.weight.data.narrow(0, span.dst_row, span.num_rows).copy_(q)
        layer.weight_scale.data.narrow(0, span.dst_row // row_block, scale.shape[0]).copy_(scale)

    def _load_checkpoint_scale(self, layer: nn.Module, src: WeightSource, span: LoadSpan) -> None:
        block_rows, block_cols = self.checkpoint_block
        first_row_block = span.src_row // block_rows
        end_row_block = -(-(span.src_row + span.num_rows) // block_rows)
        first_col_block = span.src_col // block_cols
        num_col_blocks = -(-span.num_cols // block_cols)
        blocks = src[first_row_block:end_row_block,
                     first_col_block:first_col_block + num_col_blocks].float()
        if layer.scale_block[0] == block_rows:
            rows, dst = blocks, span.dst_row // block_rows
        else:  # stored per row: repeat each block scale over the rows it covers
            skip = span.src_row - first_row_block * block_rows
            rows = blocks.repeat_interleave(block_rows, 0)[skip:skip + span.num_rows]
            dst = span.dst_row
        layer.weight_scale.data.narrow(0, dst, rows.shape[0]).copy_(rows)

    # ---- matmul ----------------------------------------------------------------------------
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out = self.matmul(layer, x2)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias

    def gemv_weight(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        # Per-output-channel scales only: a per-row scale commutes with the GEMV's row sums.
        if self.use_triton and layer.scale_block == (1, layer.weight.shape[1]):
            return layer.weight, layer.weight_scale.view(-1)
        return None

    def matmul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K] @ W^T`` in ``x``'s dtype; subclasses put their fast paths first."""
        op = self.gemv_weight(layer)
        if op is not None and uses_gemv(x, *op):  # batch-1 decode: the bandwidth-bound GEMV
            return gemv_dispatch.gemv(x, op[0], scale=op[1])
        if self.use_triton:
            return self.weight_only_gemm(layer, x)
        return self.dequantized_gemm(layer, x)

    @staticmethod
    def weight_only_gemm(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Triton: 8-bit weights read and dequantised in registers, activations unquantised."""
        from minivllm.kernels.quant_gemm import weight_quant_gemm

        return weight_quant_gemm(x, layer.weight, layer.weight_scale, *layer.scale_block)

    @staticmethod
    def dequantized_gemm(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The portable fallback: the dense weight rebuilt in the compute dtype, then a matmul.

        Per-channel scales commute with the matmul, so they scale the (smaller) output instead.
        """
        scale = layer.weight_scale
        if scale.shape[1] == 1 and layer.scale_block[0] == 1:
            return (F.linear(x, layer.weight.to(x.dtype)).float() * scale.view(-1)).to(x.dtype)
        w = dequantize_blockwise(layer.weight, scale, *layer.scale_block, x.dtype)
        return F.linear(x, w)
