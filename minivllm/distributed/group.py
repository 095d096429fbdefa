"""The tensor-parallel group handed explicitly to every sharded layer (no module-global state).

TP=1 is ``None`` everywhere: layers then never call into this module, so a single device pays
nothing for tensor parallelism. A group of size 1 is also accepted; its collectives return
their input untouched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch >= 2.13 renamed all_gather_into_tensor (one flat output buffer) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TensorParallelGroup:
    """One rank's view of a tensor-parallel group of processes.

    The collectives run on the current stream with plain ``torch.distributed`` calls, which
    NCCL records into a CUDA graph when one is being captured: nothing here syncs with the host.

    Attributes:
        rank: this process's rank inside the group (0 samples).
        world_size: number of ranks in the group.
        group: the ``torch.distributed`` process group (NCCL on CUDA, gloo on CPU), or
            ``None`` for the default (world) group.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        # The world group is kept as None, not as torch's object: then destroy_process_group()
        # drops the last reference and gloo joins its worker threads right there. Held here,
        # the group outlived it to interpreter shutdown, where a worker thread still releasing
        # a tensor of the last collective aborted the process (exit code -6, seen under load).
        self.group = group
        resolved = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(resolved)
        self.world_size = dist.get_world_size(resolved)
        # broadcast() takes a global rank in older torch; resolve the group's rank 0 once.
        self._src_global_rank = dist.get_global_rank(resolved, 0)
        self.backend = str(dist.get_backend(resolved))

    @property
    def is_first_rank(self) -> bool:
        """True on the rank that samples and talks to the scheduler."""
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` (same shape on all ranks) along ``dim``."""
        if self.world_size == 1:
            return tensor
        dim = dim % tensor.dim()
        tensor = tensor.contiguous()
        # Gather along dim 0 into one buffer (a single collective, capturable), then move the
        # rank axis next to ``dim``.
        out = tensor.new_empty((self.world_size * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_single(out, tensor, group=self.group)
        out = out.view(self.world_size, *tensor.shape).movedim(0, dim)  # [..., world, size_dim, ...]
        shape = list(tensor.shape)
        shape[dim] *= self.world_size
        return out.reshape(shape)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with rank 0's copy, in place; returns it."""
        if self.world_size > 1:
            dist.broadcast(tensor, src=self._src_global_rank, group=self.group)
        return tensor

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def __repr__(self) -> str:
        return f"TensorParallelGroup(rank={self.rank}, world_size={self.world_size}, backend={self.backend})"


def tp_rank_and_size(tp_group: TensorParallelGroup | None) -> tuple[int, int]:
    """``(rank, world_size)``, with ``None`` meaning a single rank."""
    if tp_group is None:
        return 0, 1
    return tp_group.rank, tp_group.world_size
