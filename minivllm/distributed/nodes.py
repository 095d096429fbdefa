"""Tensor parallelism over several hosts: where the ranks live and how they find each other.

Host 0 runs the engine. Its process is rank 0; it starts ranks ``1..L-1`` locally (``L`` ranks
per host) and hosts the rendezvous: a ``torch.distributed`` TCPStore on ``MASTER_PORT``, in
which it publishes the worker start-up description (backend, device type, control-channel
address). Every other host runs ``minivllm worker`` (or one ``python -m
minivllm.distributed`` per rank under a launcher that sets ``RANK``/``WORLD_SIZE``,
as torchrun does), which reads that description from the store and joins the same process
group and the same control channel.

The engine side is configured by the environment variables torch.distributed users already
set: ``MASTER_ADDR`` / ``MASTER_PORT`` (host 0's address as the other hosts reach it, and a free
port there) and ``NNODES`` (hosts in all; the engine's ``tensor_parallel_size`` is the total
number of ranks, split evenly over the hosts). Without ``NNODES`` > 1 nothing changes: all ranks
are local and bound to loopback.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass

# Key under which rank 0 publishes the pickled WorkerSpec template in the rendezvous store.
WORKER_SPEC_KEY = "minivllm/worker_spec"


@dataclass(frozen=True)
class NodeLayout:
    """A tensor-parallel group spread over ``nnodes`` hosts with the same number of ranks each.

    Attributes:
        nnodes: number of hosts (>= 1).
        master_addr: host 0's address as the other hosts reach it.
        master_port: TCP port of the rendezvous store on host 0.
    """

    nnodes: int
    master_addr: str
    master_port: int

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"the number of nodes must be >= 1, got {self.nnodes}")
        if not self.master_addr:
            raise ValueError("MASTER_ADDR (the address of host 0) is empty")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"MASTER_PORT must be a TCP port (1-65535), got {self.master_port}")

    def ranks_per_node(self, world_size: int) -> int:
        """Ranks on each host; raises ValueError unless ``world_size`` splits evenly."""
        if world_size % self.nnodes:
            raise ValueError(f"tensor_parallel_size {world_size} does not split evenly over "
                             f"{self.nnodes} nodes")
        return world_size // self.nnodes

    def node_ranks(self, node_rank: int, world_size: int) -> range:
        """Global ranks that host ``node_rank`` holds."""
        if not 0 <= node_rank < self.nnodes:
            raise ValueError(f"node rank {node_rank} is outside 0..{self.nnodes - 1}")
        per = self.ranks_per_node(world_size)
        return range(node_rank * per, (node_rank + 1) * per)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "NodeLayout | None":
        """The engine host's layout from ``NNODES``, ``MASTER_ADDR``, ``MASTER_PORT`` (and
        ``NODE_RANK``, which must be 0 where the engine runs); None for a single host.

        Raises:
            ValueError: a multi-node setting that is incomplete or malformed.
        """
        env = os.environ if environ is None else environ
        nnodes = _int_var(env, "NNODES", 1)
        if nnodes <= 1:
            return None
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
        if missing:
            raise ValueError(f"NNODES={nnodes} needs {' and '.join(missing)} (host 0's address "
                             "and a free port there) in the environment")
        if _int_var(env, "NODE_RANK", 0) != 0:
            raise ValueError("the engine runs on node 0 (NODE_RANK=0); start the other nodes "
                             "with `minivllm worker`")
        return cls(nnodes, env["MASTER_ADDR"], _int_var(env, "MASTER_PORT", 0))


def _int_var(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def publish_worker_spec(store, spec) -> None:
    """Rank 0: make the worker start-up description readable by every host."""
    store.set(WORKER_SPEC_KEY, pickle.dumps(spec))


def fetch_worker_spec(store):
    """Any host: the description rank 0 published (waits for it up to the store's timeout)."""
    return pickle.loads(store.get(WORKER_SPEC_KEY))
