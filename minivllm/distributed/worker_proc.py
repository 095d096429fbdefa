"""The body of a tensor-parallel worker process (ranks 1..N-1), started by ``WorkerGroup``.

Control messages come from rank 0 over ZMQ (DEALER here, ROUTER there), pickled:

  rank 0 → worker:  ("run", seq, fn, args, kwargs)  |  ("shutdown",)
  worker → rank 0:  ("hello", rank, pid) | ("ready", rank, None)   (start-up)
                    | ("ok", rank, (seq, result)) | ("error", rank, traceback text)

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
    parent_pid: int


def worker_device(device_type: str, rank: int) -> torch.device:
    """``cuda:rank`` (modulo visible devices) on CUDA, else the CPU."""
    if device_type == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(device_type)


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a spawned worker: rendezvous, then serve commands until told to stop."""
    import zmq
    import torch.distributed as dist

    from minivllm.distributed.init import destroy_distributed, init_distributed

    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, str(spec.rank).encode())
    sock.setsockopt(zmq.LINGER, 2000)  # let a final error report leave before exit
    sock.connect(spec.control_address)

    def send(kind: str, payload: Any) -> None:
        sock.send(pickle.dumps((kind, spec.rank, payload)))

    exit_code = 0
    try:
        # Local set-up that can fail comes before "hello": rank 0 only starts joining the
        # process group (which blocks) once every worker got this far.
        if spec.num_threads is not None:
            torch.set_num_threads(spec.num_threads)
        device = worker_device(spec.device_type, spec.rank)
        send("hello", os.getpid())
        store = dist.TCPStore(spec.store_host, spec.store_port, spec.world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=spec.timeout_s))
        tp_group = init_distributed(spec.rank, spec.world_size, spec.backend,
                                    device_type=spec.device_type, timeout_s=spec.timeout_s,
                                    store=store)
        ctx = WorkerContext(spec.rank, spec.world_size, tp_group, device)
        send("ready", None)
        exit_code = _serve(sock, ctx, send, spec.parent_pid)
    except BaseException:  # noqa: BLE001 - everything goes back to rank 0
        send("error", traceback.format_exc())
        exit_code = 1
    finally:
        sock.close()
        zctx.term()
        if exit_code == 0:
            destroy_distributed()
    # A failed rank skips orderly teardown: its peers may be stuck in a collective with it.
    os._exit(exit_code)


def run_from_stdin() -> None:
    """``python -c`` entry point: the pickled :class:`WorkerSpec` arrives on stdin."""
    worker_main(pickle.load(sys.stdin.buffer))


def _serve(sock, ctx: WorkerContext, send, parent_pid: int) -> int:
    while True:
        if not sock.poll(PARENT_CHECK_INTERVAL_MS):
            if os.getppid() != parent_pid:
                return 1  # rank 0 is gone (we were re-parented): nobody will send "shutdown"
            continue
        msg = pickle.loads(sock.recv())
        if msg[0] == "shutdown":
            return 0
        _, seq, fn, args, kwargs = msg
        result = fn(ctx, *args, **kwargs)
        send("ok", (seq, result))
