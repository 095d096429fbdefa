"""How a linear layer stores its weight and computes ``x @ W^T``: the ``LinearMethod`` seam.

The tensor-parallel layers (``minivllm.layers.linear``) decide *which* rows and columns of a
checkpoint tensor a rank holds; a method decides *how* they are stored (dense, float8, int8
with scales) and how the matmul runs. One method object is shared by every linear layer of a
model; per-layer state lives on the layer (``weight``, ``weight_scale``, ...).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from minivllm.layers.dense import dense_linear
from minivllm.layers.weight_loading import WeightSource


@dataclass(frozen=True)
class LoadSpan:
    """The logical rows/columns of a checkpoint weight that one rank takes, and where they go.

    Logical means in units of the dense weight (output rows, input columns), whatever the
    stored parameter's own units are (a block scale has one entry per 128 x 128 block).

    Attributes:
        src_row: first checkpoint row taken.
        num_rows: rows taken.
        dst_row: row of the layer's (possibly fused) weight where they land.
        src_col: first checkpoint column taken (row-parallel layers split columns).
        num_cols: columns taken.
    """

    src_row: int
    num_rows: int
    dst_row: int
    src_col: int
    num_cols: int


@dataclass(frozen=True)
class RowPart:
    """One part of a (possibly fused) column-parallel weight, as the method sees it."""

    src_start: int
    local_size: int


class LinearMethod(ABC):
    """Creates a linear layer's weights, loads checkpoint tensors into them, runs the matmul."""

    #: True when the weight is stored in fewer bits than the compute dtype.
    quantized: bool = False
    #: Parameters filled as a side effect of loading ``weight`` (not read from the checkpoint).
    derived_params: frozenset[str] = frozenset()

    @abstractmethod
    def create_weights(self, layer: nn.Module, out_features: int, in_features: int,
                       row_parts: list[RowPart], in_start: int) -> None:
        """Register the layer's weight parameters (``weight`` and any scales).

        ``row_parts`` are the fused parts' checkpoint row ranges on this rank, ``in_start`` the
        first checkpoint column this rank holds (row-parallel layers).

        Raises:
            ValueError: the shard boundaries split a checkpoint's quantisation blocks.
        """

    @abstractmethod
    def checkpoint_shape(self, param_name: str, rows: int, cols: int) -> tuple[int, ...]:
        """Shape of checkpoint tensor ``param_name`` for a ``rows x cols`` logical weight."""

    @abstractmethod
    def load(self, layer: nn.Module, param_name: str, src: WeightSource, span: LoadSpan) -> None:
        """Copy (and convert or quantise) ``span`` of checkpoint tensor ``src`` into the layer."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W^T (+ bias)`` with ``x`` of shape ``[..., in_features]`` in the compute dtype."""

    def gemv_weight(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(weight, per-row scale or None)`` when the batch-1 GEMV kernel (and the norm / SiLU
        fused into it) can run this layer's matmul; None when only :meth:`apply` can."""
        return None


def read_span(src: WeightSource, span: LoadSpan) -> torch.Tensor:
    """The ``span`` rows x columns of a 2-D checkpoint tensor; reads only those from disk."""
    return src[span.src_row:span.src_row + span.num_rows, span.src_col:span.src_col + span.num_cols]


class UnquantizedLinearMethod(LinearMethod):
    """The weight as stored, in the compute dtype: ``dense_linear`` (``F.linear``, or the batch-1
    GEMV kernel on CUDA)."""

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int,
                       row_parts: list[RowPart], in_start: int) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features))

    def checkpoint_shape(self, param_name: str, rows: int, cols: int) -> tuple[int, ...]:
        if param_name != "weight":
            raise ValueError(f"unexpected tensor {param_name!r} for an unquantised linear layer "
                             f"(a quantised checkpoint without quantization_config in config.json?)")
        return rows, cols

    def load(self, layer: nn.Module, param_name: str, src: WeightSource, span: LoadSpan) -> None:
        data = read_span(src, span)
        if data.dtype.itemsize == 1:  # 8-bit codes: copying them as values would be a different model
            raise ValueError(f"checkpoint weight is {data.dtype} but config.json declares no "
                             f"quantization_config that says how to scale it")
        layer.weight.data.narrow(0, span.dst_row, span.num_rows).copy_(data)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return dense_linear(x, layer.weight, bias)

    def gemv_weight(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        return layer.weight, None
