"""Joining the torch.distributed world: from torchrun's environment variables or explicit args."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from minivllm.distributed.group import TensorParallelGroup

_ENV_VARS = ("MASTER_ADDR", "MASTER_PORT")


def default_backend(device_type: str) -> str:
    """NCCL for CUDA tensors, gloo for everything else."""
    return "nccl" if device_type == "cuda" else "gloo"


def rank_from_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the variables torchrun sets, or None if absent."""
    if not all(v in os.environ for v in (*_ENV_VARS, "RANK", "WORLD_SIZE")):
        return None
    rank = int(os.environ["RANK"])
    return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank))


def init_distributed(rank: int | None = None, world_size: int | None = None,
                     backend: str | None = None, init_method: str | None = None, *,
                     device_type: str = "cpu", timeout_s: float = 120.0,
                     store: dist.Store | None = None,
                     local_rank: int | None = None) -> TensorParallelGroup:
    """Join the default process group and return the tensor-parallel group over all its ranks.

    Rendezvous, in order of preference: an explicit ``store``; an explicit ``init_method``
    (``tcp://host:port`` or ``file:///path``); the environment torchrun sets (``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), which also supplies ``rank`` and
    ``world_size`` when they are not given. On CUDA the process is bound to
    ``cuda:LOCAL_RANK`` (or ``cuda:rank``) before NCCL starts.

    Args:
        rank, world_size: this process's global rank and the number of processes.
        backend: ``"nccl"``/``"gloo"``; default by ``device_type``.
        init_method: rendezvous URL when not using the environment.
        device_type: ``"cuda"`` or ``"cpu"``.
        timeout_s: how long collectives (and the rendezvous) may wait for a peer.
        store: an already-created ``torch.distributed`` store (e.g. a TCPStore on port 0).
        local_rank: this process's rank on its host (picks the GPU); default from
            ``LOCAL_RANK`` when the environment describes this rank, else ``rank``.

    Raises:
        ValueError: when rank/world size cannot be determined or are inconsistent.
        RuntimeError: when the default process group is already initialised.
    """
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process")
    env = rank_from_env()
    explicit_local_rank = local_rank
    local_rank = rank
    if rank is None or world_size is None:
        if env is None:
            raise ValueError("pass rank and world_size, or set RANK, WORLD_SIZE, MASTER_ADDR and "
                             "MASTER_PORT (as torchrun does)")
        rank, world_size, local_rank = env
    elif env is not None and env[0] == rank:
        local_rank = env[2]
    if explicit_local_rank is not None:
        local_rank = explicit_local_rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    if store is None and init_method is None:
        if env is None:
            raise ValueError("no rendezvous: pass init_method (tcp://host:port or file:///path) "
                             "or set MASTER_ADDR and MASTER_PORT")
        init_method = "env://"
    backend = backend or default_backend(device_type)
    if device_type == "cuda":
        # NCCL binds its communicator to the current device: pick ours first.
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is not None:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timeout)
    return TensorParallelGroup()  # the world group


def destroy_distributed() -> None:
    """Leave the default process group (a no-op when not initialised)."""
    if dist.is_initialized():
        dist.destroy_process_group()
