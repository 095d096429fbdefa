"""``minivllm worker``: run this host's share of a tensor-parallel group whose engine runs on
another host (node 0). See the README section "Tensor parallelism"."""

from __future__ import annotations

import argparse
import logging
import os


def add_worker_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``worker`` subcommand; its defaults come from torchrun's variables."""
    w = sub.add_parser("worker", help="join a multi-host tensor-parallel engine as node 1, 2, ...",
                       description="Start this host's tensor-parallel ranks and join the engine "
                                   "running on node 0 (started with NNODES, MASTER_ADDR and "
                                   "MASTER_PORT in its environment).")
    env = os.environ
    w.add_argument("--master-addr", default=env.get("MASTER_ADDR"),
                   help="address of node 0, where the engine runs (default: $MASTER_ADDR)")
    w.add_argument("--master-port", type=int, default=_int_or_none(env.get("MASTER_PORT")),
                   help="the engine's rendezvous port (default: $MASTER_PORT)")
    w.add_argument("--nnodes", type=int, default=_int_or_none(env.get("NNODES")),
                   help="hosts in all, node 0 included (default: $NNODES)")
    w.add_argument("--node-rank", type=int, default=_int_or_none(env.get("NODE_RANK")),
                   help="this host's index, 1..nnodes-1 (default: $NODE_RANK)")
    w.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks on this host; checked against tensor_parallel_size / nnodes")
    w.add_argument("--connect-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for the engine to start (default %(default)s)")
    w.add_argument("--num-threads", type=int, default=None,
                   help="torch threads per rank on CPU (default: the engine's choice)")
    w.set_defaults(func=_worker)


def _int_or_none(raw: str | None) -> int | None:
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


def _worker(args: argparse.Namespace) -> int:
    from minivllm.distributed.node_agent import run_node
    from minivllm.distributed.nodes import NodeLayout

    given = (("--master-addr", "MASTER_ADDR", args.master_addr),
             ("--master-port", "MASTER_PORT", args.master_port),
             ("--nnodes", "NNODES", args.nnodes), ("--node-rank", "NODE_RANK", args.node_rank))
    for flag, var, value in given:
        if value is None and os.environ.get(var):
            raise ValueError(f"{var}={os.environ[var]!r} is not an integer; pass {flag}")
    missing = [flag for flag, _, value in given if value is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or the matching environment variables "
                         "MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    nodes = NodeLayout(args.nnodes, args.master_addr, args.master_port)
    try:
        return run_node(nodes, args.node_rank, nproc_per_node=args.nproc_per_node,
                        connect_timeout_s=args.connect_timeout, num_threads=args.num_threads)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
