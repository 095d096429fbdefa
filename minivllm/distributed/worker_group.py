"""Rank 0's handle on N-1 tensor-parallel worker processes: start, run commands, stop.

The caller's process is rank 0. ``start()`` spawns ranks 1..N-1, joins the torch.distributed
world with them and returns rank 0's :class:`WorkerContext`. ``execute(fn, *args)`` runs
``fn(ctx, *args)`` on every rank — the workers get it over the control channel, rank 0 runs
it in place — and returns every rank's result; ``fn`` may use collectives, since all ranks run
it at the same time.

Control channel: ZMQ (ROUTER here, one DEALER per worker) carrying pickled commands. Chosen
over a gloo ``broadcast_object_list`` because an idle worker waits in a ZMQ poll that has no
deadline (a gloo broadcast times out when the engine sits idle longer than the collective
timeout), because rank 0 can wait for replies in short polls and check between them that every
worker process is still alive, and because control traffic then never shares a communicator
with the tensor collectives (nor a CUDA stream, nor a graph being captured).

Several hosts (``nodes``, see :mod:`.nodes`): this host holds ranks ``0..L-1``; the store
listens on ``MASTER_PORT`` and the control socket on all interfaces, and the ranks of the other
hosts (started there by ``minivllm worker``) find both through the store.

Failures: a worker that raises reports the traceback and exits; a local worker that dies is
seen by its exit code, a remote one by its control connection closing. Either makes rank 0
raise :class:`WorkerError` within about a poll interval (or, if rank 0 is inside a collective,
as soon as gloo notices the closed connection), and the group is then unusable: ``shutdown()``
is the only thing left to do.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from minivllm.distributed.init import default_backend, destroy_distributed, init_distributed
from minivllm.distributed.nodes import NodeLayout, publish_worker_spec
from minivllm.distributed.worker_proc import WorkerContext, WorkerSpec, worker_device, worker_main

logger = logging.getLogger(__name__)

POLL_INTERVAL_MS = 50
# After a control connection closes, how long a local worker gets to show an exit code before
# the failure is put on the remote ranks.
_DISCONNECT_GRACE_S = 0.5


def _launch_worker(spec: WorkerSpec) -> subprocess.Popen:
    """Start one worker as a fresh interpreter.

    A plain subprocess rather than ``multiprocessing``: the engine core may itself run in a
    daemonic process, which ``multiprocessing`` forbids to have children. The worker imports
    this same ``minivllm`` (``sys.path`` travels as ``PYTHONPATH``) and reads its spec from stdin.
    """
    path = [p or os.getcwd() for p in sys.path]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "from minivllm.distributed.worker_proc import run_from_stdin; run_from_stdin()"],
        stdin=subprocess.PIPE, env=env)
    proc.stdin.write(pickle.dumps(spec))
    proc.stdin.close()
    return proc


def _kill_all(procs: list[subprocess.Popen]) -> None:
    """Kill and reap every worker still running (no zombies, no orphans)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
            pass


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed (raised, exited or never started)."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"tensor-parallel worker rank {rank}: {message}")
        self.rank = rank


class WorkerGroup:
    """Spawns and drives ranks 1..N-1 of a tensor-parallel group; this process is rank 0.

    Use as a context manager, or call ``start()`` and ``shutdown()``.
    """

    def __init__(self, world_size: int, *, device_type: str = "cpu", backend: str | None = None,
                 startup_timeout_s: float = 60.0, collective_timeout_s: float = 300.0,
                 host: str = "127.0.0.1", worker_num_threads: int | None = None,
                 nodes: NodeLayout | None = None) -> None:
        """
        Args:
            world_size: ranks in all, this process included (>= 1).
            device_type: ``"cuda"`` (rank r on ``cuda:r``) or ``"cpu"``.
            backend: torch.distributed backend; NCCL on CUDA, gloo otherwise by default.
            startup_timeout_s: how long spawning and rendezvous may take before giving up.
            collective_timeout_s: how long a collective waits for a live but stuck peer.
            host: address the rendezvous store and control socket bind to (one host).
            worker_num_threads: ``torch.set_num_threads`` in each worker (CPU runs).
            nodes: the group spans several hosts (this one is node 0); None: one host.

        Raises:
            ValueError: for a world size below 1, or one that does not split over ``nodes``.
        """
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.nodes = nodes
        # Ranks this host starts; the others (other hosts) connect by themselves.
        self.local_world_size = world_size if nodes is None else nodes.ranks_per_node(world_size)
        self.world_size = world_size
        self.device_type = device_type
        self.backend = backend or default_backend(device_type)
        self.startup_timeout_s = startup_timeout_s
        self.collective_timeout_s = collective_timeout_s
        self.host = host
        self.worker_num_threads = worker_num_threads
        self.context: WorkerContext | None = None
        self._procs: dict[int, subprocess.Popen] = {}
        self._zctx = None
        self._sock = None
        self._monitor = None
        self._store = None
        self._seq = 0
        self._failure: WorkerError | None = None
        self._owns_dist = False

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> WorkerContext:
        """Spawn the workers, rendezvous and return rank 0's context.

        Raises:
            WorkerError: a worker failed to start, died, or the rendezvous timed out; every
                spawned process has been stopped by then.
            RuntimeError: when called twice.
        """
        if self.context is not None or self._procs:
            raise RuntimeError("WorkerGroup.start() called twice")
        import torch.distributed as dist
        import zmq

        # One host: loopback, any free port. Several: the agreed port, reachable from outside.
        store_host, store_port = (self.host, 0) if self.nodes is None else (
            self.nodes.master_addr, self.nodes.master_port)
        self._store = dist.TCPStore(store_host, store_port, self.world_size, is_master=True,
                                    timeout=datetime.timedelta(seconds=self.startup_timeout_s),
                                    wait_for_workers=False)
        self._zctx = zmq.Context()
        self._sock = self._zctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished worker raises
        self._sock.setsockopt(zmq.LINGER, 0)
        if self.nodes is None:
            control = f"tcp://{self.host}:{self._sock.bind_to_random_port(f'tcp://{self.host}')}"
        else:
            # Remote ranks have no process handle here: their closed connection is the signal.
            self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            control = f"tcp://{self.nodes.master_addr}:{self._sock.bind_to_random_port('tcp://*')}"
        template = WorkerSpec(0, self.world_size, self.backend, self.device_type, store_host,
                              self._store.port, control, self.collective_timeout_s,
                              self.worker_num_threads, os.getpid())
        if self.nodes is not None:
            publish_worker_spec(self._store, template)
            logger.info("tensor parallelism over %d nodes: waiting up to %.0f s for ranks %d..%d "
                        "(`minivllm worker --master-addr %s --master-port %d --nnodes %d "
                        "--node-rank K` on each other node)", self.nodes.nnodes,
                        self.startup_timeout_s, self.local_world_size, self.world_size - 1,
                        self.nodes.master_addr, self.nodes.master_port, self.nodes.nnodes)
        for rank in range(1, self.local_world_size):
            self._procs[rank] = _launch_worker(dataclasses.replace(template, rank=rank))
        # Whatever happens to this object or the interpreter, the workers go with it.
        self._finalizer = weakref.finalize(self, _kill_all, list(self._procs.values()))
        try:
            tp_group = self._rendezvous()
        except BaseException:
            self.shutdown()
            raise
        self.context = WorkerContext(0, self.world_size, tp_group,
                                     worker_device(self.device_type, 0))
        return self.context

    def _rendezvous(self):
        deadline = time.monotonic() + self.startup_timeout_s
        # Every worker first reports "hello" after its local set-up (imports, device, threads),
        # so the common start-up failures surface here, before anyone blocks in a rendezvous.
        self._await_workers("hello", deadline)
        # Rank 0 joins the process group on a helper thread, because joining blocks until every
        # rank arrives; this thread meanwhile watches the workers so a dead one fails fast.
        outcome: dict[str, Any] = {}

        def join() -> None:
            try:
                outcome["group"] = init_distributed(
                    0, self.world_size, self.backend, device_type=self.device_type,
                    timeout_s=self.collective_timeout_s, store=self._store)
            except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                outcome["error"] = e

        joiner = threading.Thread(target=join, name="minivllm-tp-rendezvous", daemon=True)
        joiner.start()
        ready: set[int] = set()
        while joiner.is_alive() or len(ready) < self.world_size - 1:
            msg = self._recv(POLL_INTERVAL_MS)
            if msg is not None:
                kind, rank, payload = msg
                if kind == "error":
                    raise self._fail(rank, f"failed to start:\n{payload}")
                if kind == "ready":
                    ready.add(rank)
            self._check_processes(pending=set(range(1, self.world_size)) - ready, stage="starting")
            if "error" in outcome:
                break
            if time.monotonic() > deadline:
                raise self._fail(min(set(range(1, self.world_size)) - ready, default=0),
                                 f"rendezvous did not finish within {self.startup_timeout_s:.0f} s")
        if "error" in outcome:
            raise self._fail(0, f"rank 0 could not join the process group: {outcome['error']!r}")
        self._owns_dist = True
        return outcome["group"]

    def _await_workers(self, kind: str, deadline: float) -> None:
        """Wait until every worker has sent a ``kind`` message; raise on error, exit or timeout."""
        pending = set(range(1, self.world_size))
        while pending:
            msg = self._recv(POLL_INTERVAL_MS)
            if msg is not None:
                if msg[0] == "error":
                    raise self._fail(msg[1], f"failed to start:\n{msg[2]}")
                if msg[0] == kind:
                    pending.discard(msg[1])
                continue
            self._check_processes(pending, stage="starting")
            if time.monotonic() > deadline:
                raise self._fail(min(pending), f"did not start within {self.startup_timeout_s:.0f} s")

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop every worker (ask, wait ``timeout_s``, then kill) and leave the process group.

        Safe to call more than once and after a failure; leaves no child process behind.
        """
        remote = set(range(self.local_world_size, self.world_size))
        if self._sock is not None:
            for rank in range(1, self.world_size):
                proc = self._procs.get(rank)
                if proc is not None and proc.poll() is not None:
                    continue
                try:
                    self._sock.send_multipart([str(rank).encode(), pickle.dumps(("shutdown",))])
                except Exception:  # noqa: BLE001 - unreachable worker: killed below (or gone)
                    remote.discard(rank)
        deadline = time.monotonic() + timeout_s
        if self._sock is not None and self._failure is None:
            # Remote ranks confirm before this end closes (closing first could drop "shutdown").
            while remote and time.monotonic() < deadline:
                msg = self._recv(POLL_INTERVAL_MS)
                if msg is not None and msg[0] == "bye":
                    remote.discard(msg[1])
        for proc in self._procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _kill_all(list(self._procs.values()))
        self._procs = {}
        if self._owns_dist:
            destroy_distributed()
            self._owns_dist = False
        if self._sock is not None:
            if self._monitor is not None:
                self._sock.disable_monitor()
                self._monitor.close(linger=0)
                self._monitor = None
            self._sock.close(linger=0)
            self._zctx.term()
            self._sock = self._zctx = None
        self._store = None
        self.context = None

    def __enter__(self) -> "WorkerGroup":
        if self.context is None:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # ---- commands ------------------------------------------------------------------------
    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the ranks this host started, 1..L-1 (empty after shutdown)."""
        return [self._procs[r].pid for r in sorted(self._procs)]

    def execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(ctx, *args, **kwargs)`` on every rank; returns the results, rank 0 first.

        ``fn`` must be importable by name (a module-level function of an importable module,
        not of ``__main__``) and its arguments and result picklable. Rank 0 runs it after
        sending it to the workers, so all ranks enter its collectives together.

        Raises:
            WorkerError: a worker raised or died (the group is then unusable).
            RuntimeError: the group is not started.
        """
        if self.context is None:
            raise RuntimeError("WorkerGroup is not started (call start())")
        if self._failure is not None:
            raise self._failure
        self._seq += 1
        payload = pickle.dumps(("run", self._seq, fn, args, kwargs))
        for rank in range(1, self.world_size):
            try:
                self._sock.send_multipart([str(rank).encode(), payload])
            except Exception as e:  # noqa: BLE001 - ZMQ "host unreachable": the worker is gone
                raise self._fail(rank, f"cannot be reached ({e})") from None
        try:
            local = fn(self.context, *args, **kwargs)
        except Exception as e:
            # A collective on rank 0 usually fails *because* a worker did: report that one.
            failure = self._worker_failure(grace_s=2.0)
            if failure is not None:
                raise failure from e
            raise
        return [local, *self._collect(self._seq)]

    def check_alive(self) -> None:
        """Raise :class:`WorkerError` if any worker process has exited."""
        if self._failure is not None:
            raise self._failure
        self._check_processes(set(range(1, self.world_size)), stage="idle")

    # ---- internals -----------------------------------------------------------------------
    def _collect(self, seq: int) -> list[Any]:
        results: dict[int, Any] = {}
        pending = set(range(1, self.world_size))
        while pending:
            msg = self._recv(POLL_INTERVAL_MS)
            if msg is None:
                self._check_processes(pending, stage="running a command")
                continue
            kind, rank, payload = msg
            if kind == "error":
                raise self._fail(rank, f"command failed:\n{payload}")
            if kind == "ok" and payload[0] == seq:
                results[rank] = payload[1]
                pending.discard(rank)
        return [results[r] for r in range(1, self.world_size)]

    def _worker_failure(self, grace_s: float) -> WorkerError | None:
        """A worker's error report or exit seen within ``grace_s``, else None."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            msg = self._recv(POLL_INTERVAL_MS)
            if msg is not None and msg[0] == "error":
                return self._fail(msg[1], f"command failed:\n{msg[2]}")
            try:
                self._check_processes(set(range(1, self.world_size)), stage="running a command")
            except WorkerError as e:
                return e
        return None

    def _recv(self, timeout_ms: int):
        if not self._sock.poll(timeout_ms):
            return None
        _, data = self._sock.recv_multipart()
        return pickle.loads(data)

    def _check_processes(self, pending: set[int], stage: str) -> None:
        for rank in sorted(pending):
            proc = self._procs.get(rank)
            code = None if proc is None else proc.poll()
            if code is not None:
                raise self._fail(rank, f"process exited with code {code} while {stage}")
        if self._monitor is not None and self._monitor.poll(0):
            # Some worker's control connection closed. A local one shows its exit code soon;
            # otherwise it was a rank on another host (which one, ZMQ does not say).
            deadline = time.monotonic() + _DISCONNECT_GRACE_S
            while time.monotonic() < deadline:
                for rank, proc in sorted(self._procs.items()):
                    if proc.poll() is not None:
                        raise self._fail(rank, f"process exited with code {proc.returncode} "
                                               f"while {stage}")
                time.sleep(0.05)
            remote = range(self.local_world_size, self.world_size)
            raise self._fail(remote[0], f"a worker on another host (ranks {remote[0]}.."
                                        f"{remote[-1]}) closed its control connection while "
                                        f"{stage}: its process or host is gone")

    def _fail(self, rank: int, message: str) -> WorkerError:
        if self._failure is None:
            self._failure = WorkerError(rank, message)
        return self._failure
