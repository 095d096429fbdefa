"""The body of a tensor-parallel worker process (ranks 1..N-1).

Started by ``WorkerGroup`` on the engine's host (spec on stdin), or on another host by
``minivllm worker`` / any launcher that sets torchrun's variables (``python -m
minivllm.distributed``: rank from ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``, the rest
read from the rendezvous store at ``MASTER_ADDR:MASTER_PORT``, see :mod:`.nodes`).

Control messages come from rank 0 over ZMQ (DEALER here, ROUTER there), pickled:

  rank 0 → worker:  ("run", seq, fn, args, kwargs)  |  ("shutdown",)
  worker → rank 0:  ("hello", rank, pid) | ("ready", rank, None)   (start-up)
                    | ("ok", rank, (seq, result)) | ("error", rank, traceback text)
                    | ("bye", rank, None)   (after "shutdown": rank 0 may close the channel)

A worker stops when told to, when its parent process goes (re-parented), or when its control
connection to rank 0 closes (rank 0's process or host is gone).

Tensors never travel here: they go through torch.distributed collectives inside ``fn``.
A command that raises leaves the ranks' collectives out of step, so the worker reports the
error and exits; its closed connections then also unblock rank 0 if it waits in a collective.
"""

from __future__ import annotations

import datetime
import os
import pickle
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

# Idle workers wake up this often to check that rank 0's process is still there.
PARENT_CHECK_INTERVAL_MS = 500


@dataclass
class WorkerContext:
    """What a command receives on every rank (rank 0's lives in the caller's process).

    Attributes:
        rank: tensor-parallel rank (0 is the caller).
        world_size: number of ranks.
        tp_group: the group to hand to ``load_model``/layers.
        device: this rank's device (``cuda:rank`` or ``cpu``).
        state: free-form storage that commands use to keep objects (a model shard, a runner)
            for later commands.
    """

    rank: int
    world_size: int
    tp_group: Any  # TensorParallelGroup; Any keeps this module import-light
    device: torch.device
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to start (picklable; passed through ``spawn``)."""

    rank: int
    world_size: int
    backend: str
    device_type: str
    store_host: str
    store_port: int
    control_address: str
    timeout_s: float
    num_threads: int | None
    parent_pid: int | None  # exit when re-parented away from it; None: do not watch
    local_rank: int | None = None  # rank on this host (picks the GPU); None: same as rank


def worker_device(device_type: str, local_rank: int) -> torch.device:
    """``cuda:local_rank`` (modulo visible devices) on CUDA, else the CPU."""
    if device_type == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(device_type)


def worker_main(spec: WorkerSpec, store=None) -> None:
    """Entry point of a worker: rendezvous, then serve commands until told to stop.

    Args:
        spec: who this worker is and where rank 0 is.
        store: an open client of the rendezvous store (else one is opened from ``spec``).
    """
    import zmq
    import torch.distributed as dist

    from minivllm.distributed.init import destroy_distributed, init_distributed

    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, str(spec.rank).encode())
    sock.setsockopt(zmq.LINGER, 2000)  # let a final error report leave before exit
    # A closed connection to rank 0 means it is gone (its host too, perhaps): stop then.
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sock.connect(spec.control_address)
    local_rank = spec.rank if spec.local_rank is None else spec.local_rank

    def send(kind: str, payload: Any) -> None:
        sock.send(pickle.dumps((kind, spec.rank, payload)))

    exit_code = 0
    try:
        # Local set-up that can fail comes before "hello": rank 0 only starts joining the
        # process group (which blocks) once every worker got this far.
        if spec.num_threads is not None:
            torch.set_num_threads(spec.num_threads)
        device = worker_device(spec.device_type, local_rank)
        send("hello", os.getpid())
        if store is None:
            store = dist.TCPStore(spec.store_host, spec.store_port, spec.world_size, is_master=False,
                                  timeout=datetime.timedelta(seconds=spec.timeout_s))
        tp_group = init_distributed(spec.rank, spec.world_size, spec.backend,
                                    device_type=spec.device_type, timeout_s=spec.timeout_s,
                                    store=store, local_rank=local_rank)
        ctx = WorkerContext(spec.rank, spec.world_size, tp_group, device)
        send("ready", None)
        exit_code = _serve(sock, monitor, ctx, send, spec.parent_pid)
    except BaseException:  # noqa: BLE001 - everything goes back to rank 0
        send("error", traceback.format_exc())
        exit_code = 1
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close()
        zctx.term()
        if exit_code == 0:
            destroy_distributed()
    # A failed rank skips orderly teardown: its peers may be stuck in a collective with it.
    os._exit(exit_code)


def run_from_stdin() -> None:
    """``python -c`` entry point: the pickled :class:`WorkerSpec` arrives on stdin."""
    worker_main(pickle.load(sys.stdin.buffer))


def run_from_env(connect_timeout_s: float = 300.0, num_threads: int | None = None) -> None:
    """One rank started by a launcher, as torchrun starts its processes.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (default: ``RANK``), ``MASTER_ADDR`` and
    ``MASTER_PORT``; everything else (backend, device type, control address) comes from the
    description rank 0 publishes in the rendezvous store, waited for up to
    ``connect_timeout_s`` (so a worker may be started before the engine). ``num_threads``
    overrides the engine's ``torch.set_num_threads`` choice (CPU ranks).
    """
    import dataclasses

    import torch.distributed as dist

    from minivllm.distributed.init import rank_from_env
    from minivllm.distributed.nodes import fetch_worker_spec

    env = rank_from_env()
    if env is None:
        raise SystemExit("set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (as torchrun does)")
    rank, world_size, local_rank = env
    if rank == 0:
        raise SystemExit("rank 0 is the engine itself (LLM / minivllm serve with NNODES set); "
                         "workers are ranks 1 and up")
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(addr, port, world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=connect_timeout_s))
    template: WorkerSpec = fetch_worker_spec(store)
    if template.world_size != world_size:
        raise SystemExit(f"WORLD_SIZE={world_size} here, but the engine runs "
                         f"tensor_parallel_size={template.world_size}")
    store.set_timeout(datetime.timedelta(seconds=template.timeout_s))
    spec = dataclasses.replace(template, rank=rank, local_rank=local_rank, store_host=addr,
                               store_port=port, parent_pid=os.getppid(),
                               num_threads=num_threads or template.num_threads)
    worker_main(spec, store=store)


def _serve(sock, monitor, ctx: WorkerContext, send, parent_pid: int | None) -> int:
    while True:
        if not sock.poll(PARENT_CHECK_INTERVAL_MS):
            if parent_pid is not None and os.getppid() != parent_pid:
                return 1  # our parent is gone (we were re-parented): nobody will send "shutdown"
            if monitor.poll(0):
                return 1  # rank 0's end of the control channel closed without a "shutdown"
            continue
        msg = pickle.loads(sock.recv())
        if msg[0] == "shutdown":
            send("bye", None)
            return 0
        _, seq, fn, args, kwargs = msg
        result = fn(ctx, *args, **kwargs)
        send("ok", (seq, result))

