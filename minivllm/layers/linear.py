"""Tensor-parallel linear layers (Megatron style): column-parallel then row-parallel.

A column-parallel layer splits its output features over ranks and needs no communication; the
row-parallel layer after it splits its input features the same way, so each rank computes a
partial sum and one all-reduce completes it. An attention block and an MLP each cost one
all-reduce.

With ``tp_group=None`` (or a group of one) an unquantised layer is one ``dense_linear`` on the
full weight (``F.linear``, or the batch-1 GEMV kernel on CUDA), so TP=1 pays nothing.
Parameter names stay ``weight``/``bias`` so checkpoints and the GGUF conversion map unchanged.

How the weight is stored and multiplied (dense, fp8, int8 with scales) is the layer's
``LinearMethod`` (``minivllm.layers.quantization``); the layers here only decide which rows and
columns of each checkpoint tensor this rank holds, in logical (dense-weight) units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minivllm.distributed.group import TensorParallelGroup, tp_rank_and_size
from minivllm.distributed.sharding import divide, first_kv_head, kv_heads_per_rank
from minivllm.layers import gemv_dispatch
from minivllm.layers.activation import silu_and_mul
from minivllm.layers.dense import silu_and_mul_linear, uses_gemv
from minivllm.layers.norm import RMSNorm
from minivllm.layers.quantization.base import (LinearMethod, LoadSpan, RowPart,
                                               UnquantizedLinearMethod)
from minivllm.layers.weight_loading import WeightSource, check_shape, copy_replicated, read_range


def _active(tp_group: TensorParallelGroup | None) -> TensorParallelGroup | None:
    """The group if it has more than one rank: layers test ``self.tp is None`` on the hot path."""
    return tp_group if tp_group is not None and tp_group.world_size > 1 else None


@dataclass(frozen=True)
class OutputPart:
    """One logical part of a (possibly merged) column-parallel weight, e.g. ``k`` of qkv.

    Attributes:
        full_size: rows of this part at TP=1 (in the checkpoint tensor).
        src_start: first checkpoint row this rank holds.
        local_size: rows this rank holds.
    """

    full_size: int
    src_start: int
    local_size: int


class MergedColumnParallelLinear(nn.Module):
    """Output features split over ranks, for one or several weights fused into one matmul.

    The local weight is the concatenation of this rank's rows of each part, so a merged layer
    (gate/up, q/k/v) still runs as one matmul per rank. The output stays sharded.
    """

    def __init__(self, in_features: int, parts: list[OutputPart], bias: bool,
                 tp_group: TensorParallelGroup | None = None,
                 method: LinearMethod | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.parts = parts
        self.tp = _active(tp_group)
        self.out_features = sum(p.local_size for p in parts)
        self.method = method or UnquantizedLinearMethod()
        self.method.create_weights(self, self.out_features, in_features,
                                   [RowPart(p.src_start, p.local_size) for p in parts], 0)
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None

    @classmethod
    def even(cls, in_features: int, output_sizes: list[int], bias: bool,
             tp_group: TensorParallelGroup | None = None,
             method: LinearMethod | None = None) -> "MergedColumnParallelLinear":
        """Each part split into equal contiguous blocks, rank ``r`` taking block ``r``."""
        rank, size = tp_rank_and_size(tp_group)
        parts = []
        for full in output_sizes:
            local = divide(full, size, "output features")
            parts.append(OutputPart(full, rank * local, local))
        return cls(in_features, parts, bias, tp_group, method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)

    def forward_with_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                          norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(norm(x + residual)), x + residual)``: a block's pre-norm and this layer.

        Without ``residual`` (the first block) the norm is of ``x``, which is returned as the
        residual stream. At batch-1 decode on CUDA the norm runs inside the GEMV kernel: one
        launch instead of two, and the normalised row never goes through memory.
        """
        op = self.method.gemv_weight(self)
        if op is not None and uses_gemv(x, *op) and norm.weight.dtype == x.dtype:
            return gemv_dispatch.rms_norm_gemv(x, residual, norm.weight, norm.eps, op[0],
                                               self.bias, op[1])
        if residual is None:
            return self(norm(x)), x
        x, residual = norm(x, residual)
        return self(x), residual

    # ---- loading -------------------------------------------------------------------------
    def full_shape(self, param_name: str) -> tuple[int, ...]:
        rows = sum(p.full_size for p in self.parts)
        if param_name == "bias":
            return (rows,)
        return self.method.checkpoint_shape(param_name, rows, self.in_features)

    def load_weight(self, param_name: str, src: WeightSource, shard_id: int | None = None) -> None:
        """Copy this rank's rows of part ``shard_id`` (or of every part when ``src`` is the whole
        fused TP=1 tensor, ``shard_id=None``)."""
        if shard_id is None and len(self.parts) > 1:
            if param_name not in ("weight", "bias"):
                raise ValueError(f"fused {param_name} tensors are not supported; the checkpoint "
                                 f"must store its parts (q/k/v, gate/up) separately")
            check_shape(src, self.full_shape(param_name), f"fused {param_name}")
            start = 0
            for i, part in enumerate(self.parts):
                self.load_weight(param_name, src[start:start + part.full_size], i)
                start += part.full_size
            return
        part = self.parts[shard_id or 0]
        offset = sum(p.local_size for p in self.parts[:shard_id or 0])
        if param_name == "bias":
            check_shape(src, (part.full_size,), f"bias part {shard_id or 0}")
            self.bias.data.narrow(0, offset, part.local_size).copy_(
                read_range(src, 0, part.src_start, part.local_size))
            return
        check_shape(src, self.method.checkpoint_shape(param_name, part.full_size, self.in_features),
                    f"{param_name} part {shard_id or 0}")
        self.method.load(self, param_name, src,
                         LoadSpan(part.src_start, part.local_size, offset, 0, self.in_features))


def ColumnParallelLinear(in_features: int, out_features: int, bias: bool,
                         tp_group: TensorParallelGroup | None = None,
                         method: LinearMethod | None = None) -> MergedColumnParallelLinear:
    """A single column-parallel weight: a merged layer with one part."""
    return MergedColumnParallelLinear.even(in_features, [out_features], bias, tp_group, method)


class QKVParallelLinear(MergedColumnParallelLinear):
    """Fused q/k/v projection with attention heads split over ranks.

    Query heads split evenly; KV heads split evenly too, or, when there are fewer KV heads than
    ranks, each rank keeps the one KV head its query heads use (replicated across neighbours).
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool, tp_group: TensorParallelGroup | None = None,
                 method: LinearMethod | None = None) -> None:
        rank, size = tp_rank_and_size(tp_group)
        num_local_heads = divide(num_heads, size, "num_attention_heads")
        num_local_kv_heads = kv_heads_per_rank(num_kv_heads, size)
        kv_start = first_kv_head(num_kv_heads, size, rank) * head_dim
        q_local = num_local_heads * head_dim
        kv_local = num_local_kv_heads * head_dim
        parts = [OutputPart(num_heads * head_dim, rank * q_local, q_local),
                 OutputPart(num_kv_heads * head_dim, kv_start, kv_local),
                 OutputPart(num_kv_heads * head_dim, kv_start, kv_local)]
        super().__init__(hidden_size, parts, bias, tp_group, method)
        self.num_local_heads = num_local_heads
        self.num_local_kv_heads = num_local_kv_heads
        self.q_size, self.kv_size = q_local, kv_local


class RowParallelLinear(nn.Module):
    """Input features split over ranks; the partial outputs are summed by one all-reduce.

    Its input is the sharded output of a column-parallel layer. The bias (if any) is added
    once, after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 tp_group: TensorParallelGroup | None = None,
                 method: LinearMethod | None = None) -> None:
        super().__init__()
        rank, size = tp_rank_and_size(tp_group)
        self.tp = _active(tp_group)
        self.full_in_features = in_features
        self.in_features = divide(in_features, size, "input features")
        self.in_start = rank * self.in_features
        self.out_features = out_features
        self.method = method or UnquantizedLinearMethod()
        self.method.create_weights(self, out_features, self.in_features,
                                   [RowPart(0, out_features)], self.in_start)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor, input_act: str | None = None) -> torch.Tensor:
        """``input_act="silu_and_mul"``: ``x`` is ``cat(gate, up)`` and the layer applies
        ``silu(gate) * up`` first, fused into the matmul where the kernel allows (batch-1
        decode on CUDA), so the activation never goes through memory."""
        if input_act not in (None, "silu_and_mul"):
            raise ValueError(f"unknown input_act {input_act!r}")
        op = self.method.gemv_weight(self)
        fused = input_act is not None and op is not None and uses_gemv(x, *op)
        if input_act is not None and not fused:
            x = silu_and_mul(x)  # the activation kernel, then the method's own matmul

        def matmul(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            if fused:
                return silu_and_mul_linear(x, op[0], bias, op[1])
            return self.method.apply(self, x, bias)

        if self.tp is None:
            return matmul(x, self.bias)
        out = self.tp.all_reduce(matmul(x, None))
        return out if self.bias is None else out + self.bias

    def full_shape(self, param_name: str) -> tuple[int, ...]:
        if param_name == "bias":
            return (self.out_features,)
        return self.method.checkpoint_shape(param_name, self.out_features, self.full_in_features)

    def load_weight(self, param_name: str, src: WeightSource, shard_id: int | None = None) -> None:
        if shard_id is not None:
            raise ValueError(f"row-parallel {param_name} has no parts (got part {shard_id})")
        if param_name == "bias":
            copy_replicated(self.bias, src, "row-parallel bias")
            return
        check_shape(src, self.full_shape(param_name), f"row-parallel {param_name}")
        self.method.load(self, param_name, src,
                         LoadSpan(0, self.out_features, 0, self.in_start, self.in_features))
