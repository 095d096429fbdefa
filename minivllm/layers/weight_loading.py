"""Reading one rank's part of a checkpoint tensor.

A weight source is either a ``torch.Tensor`` or a lazily-read safetensors slice
(``safe_open(...).get_slice(name)``): both support ``src[a:b]`` / ``src[:, a:b]``, but only the
slice reads just the requested rows from disk. Sharded layers call :func:`read_range`, so under
tensor parallelism each rank reads only its shard.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

WeightSource = Any  # torch.Tensor or a safetensors PySafeSlice


class ShardedWeights(Protocol):
    """What a tensor-parallel layer offers the loader for each of its parameters."""

    def full_shape(self, param_name: str) -> tuple[int, ...]:
        """The parameter's shape at TP=1 (for merged parameters: the fused shape)."""

    def load_weight(self, param_name: str, src: WeightSource, shard_id: int | None = None) -> None:
        """Copy this rank's part of the full checkpoint tensor ``src`` into the parameter.

        ``shard_id`` picks one part of a merged parameter (q/k/v, gate/up); ``None`` means
        ``src`` is the whole (fused) TP=1 tensor.
        """


def source_shape(src: WeightSource) -> tuple[int, ...]:
    """Shape of a tensor or safetensors slice, without reading its data."""
    if isinstance(src, torch.Tensor):
        return tuple(src.shape)
    return tuple(src.get_shape())


def read_range(src: WeightSource, dim: int, start: int, length: int) -> torch.Tensor:
    """Rows ``start:start+length`` of ``src`` along ``dim`` (0 or 1); reads only those from disk."""
    index = (slice(None),) * dim + (slice(start, start + length),)
    return src[index]


def read_all(src: WeightSource) -> torch.Tensor:
    """The whole tensor."""
    return src if isinstance(src, torch.Tensor) else src[:]


def check_shape(src: WeightSource, expected: tuple[int, ...], what: str) -> None:
    """Raise ValueError when the checkpoint tensor's shape is not ``expected``."""
    got = source_shape(src)
    if got != tuple(expected):
        raise ValueError(f"shape mismatch for {what}: checkpoint {got}, model expects {tuple(expected)}")


def copy_replicated(param: torch.Tensor, src: WeightSource, what: str) -> None:
    """Load a parameter every rank holds whole (norms, biases of row-parallel layers)."""
    check_shape(src, tuple(param.shape), what)
    param.data.copy_(read_all(src))
