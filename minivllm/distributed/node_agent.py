"""``minivllm worker``: the tensor-parallel ranks of one host other than the engine's.

The agent waits for the engine (rank 0, on node 0) to publish the group's description in the
rendezvous store at ``MASTER_ADDR:MASTER_PORT``, starts this node's ranks as child processes
(``python -m minivllm.distributed`` with ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` set,
as torchrun would) and supervises them: when one fails the others are stopped; when all have
stopped the agent exits with the first non-zero code (0 after the engine's orderly shutdown).
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import subprocess
import sys
import time

from minivllm.distributed.nodes import NodeLayout, fetch_worker_spec

logger = logging.getLogger(__name__)

_POLL_S = 0.1


def run_node(nodes: NodeLayout, node_rank: int, *, nproc_per_node: int | None = None,
             connect_timeout_s: float = 300.0, num_threads: int | None = None) -> int:
    """Run node ``node_rank``'s ranks until the engine shuts them down; returns an exit code.

    Args:
        nodes: hosts in all and where node 0's rendezvous store is.
        node_rank: this host's index, 1..nnodes-1 (node 0 runs the engine).
        nproc_per_node: if given, checked against the engine's ``tensor_parallel_size / nnodes``.
        connect_timeout_s: how long to wait for the engine to come up.
        num_threads: ``torch.set_num_threads`` in each rank (CPU), overriding the engine's choice.

    Raises:
        ValueError: an inconsistent layout (wrong node rank, ranks per node that disagree).
        RuntimeError: the engine did not publish its description within ``connect_timeout_s``.
    """
    import torch.distributed as dist

    if node_rank == 0:
        raise ValueError("node 0 runs the engine (LLM / minivllm serve with NNODES set); "
                         "`minivllm worker` is for nodes 1 and up")
    if not 0 < node_rank < nodes.nnodes:
        raise ValueError(f"--node-rank {node_rank} is outside 1..{nodes.nnodes - 1}")
    logger.info("waiting for the engine's rendezvous at %s:%d", nodes.master_addr, nodes.master_port)
    try:
        store = dist.TCPStore(nodes.master_addr, nodes.master_port, is_master=False,
                              timeout=datetime.timedelta(seconds=connect_timeout_s))
        template = fetch_worker_spec(store)
    except (RuntimeError, TimeoutError) as e:  # DistStoreError / DistNetworkError derive from them
        raise RuntimeError(f"no engine at {nodes.master_addr}:{nodes.master_port} within "
                           f"{connect_timeout_s:.0f} s ({e})") from None
    del store
    world_size = template.world_size
    ranks = nodes.node_ranks(node_rank, world_size)
    if nproc_per_node is not None and nproc_per_node != len(ranks):
        raise ValueError(f"--nproc-per-node {nproc_per_node}, but the engine runs "
                         f"tensor_parallel_size={world_size} over {nodes.nnodes} nodes "
                         f"({len(ranks)} per node)")
    logger.info("engine found: world size %d, starting ranks %d..%d", world_size, ranks[0], ranks[-1])
    procs = [_start_rank(nodes, rank, local_rank, world_size, len(ranks), connect_timeout_s, num_threads)
             for local_rank, rank in enumerate(ranks)]
    return _supervise(procs)


def _start_rank(nodes: NodeLayout, rank: int, local_rank: int, world_size: int, local_world_size: int,
                connect_timeout_s: float, num_threads: int | None) -> subprocess.Popen:
    env = dict(os.environ, MASTER_ADDR=nodes.master_addr, MASTER_PORT=str(nodes.master_port),
               RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
               LOCAL_WORLD_SIZE=str(local_world_size),
               PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    code = ("from minivllm.distributed.worker_proc import run_from_env; "
            f"run_from_env(connect_timeout_s={connect_timeout_s!r}, num_threads={num_threads!r})")
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def _supervise(procs: list[subprocess.Popen]) -> int:
    """Wait for every rank; stop the rest when one fails or this agent is told to stop."""
    stop: list[int] = []

    def on_signal(signum, _frame) -> None:
        stop.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    exit_code = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or stop:
                exit_code = failed[0] if failed else 128 + stop[0]
                break
            time.sleep(_POLL_S)
        else:
            exit_code = next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(5.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if exit_code < 0:  # killed by a signal: report it the shell's way
        exit_code = 128 - exit_code
    return exit_code
