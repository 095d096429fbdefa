"""WorkerGroup life cycle: clean shutdown, and every kind of worker failure surfacing in rank 0
as a WorkerError within seconds (never a hang), with no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from minivllm.distributed import WorkerError, WorkerGroup
from tests.distributed import tp_commands as cmd


def _gone(pid: int) -> bool:
    """Exited (a zombie left for a re-parented child's new parent to reap counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _worker_children(parent: int | None = None) -> list[int]:
    """Pids of ``parent``'s (default: this process's) children that run a tensor-parallel
    worker (Linux /proc)."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == parent and b"run_from_stdin" in cmdline:
            found.append(int(entry))
    return found


def _assert_no_workers(pids: list[int]) -> None:
    assert pids and all(_gone(p) for p in pids)
    assert _worker_children() == []


def test_shutdown_leaves_no_processes():
    group = WorkerGroup(2, worker_num_threads=1)
    ctx = group.start()
    assert (ctx.rank, ctx.world_size, ctx.tp_group.world_size) == (0, 2, 2)
    pids = group.worker_pids
    assert group.execute(cmd.collectives)[1] == (3.0, [[0.0, 1.0], [0.0, 1.0]], 5.0)
    group.shutdown()
    _assert_no_workers(pids)
    group.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="not started"):
        group.execute(cmd.collectives)


def test_worker_killed_mid_collective_raises_in_rank0():
    group = WorkerGroup(2, worker_num_threads=1)
    group.start()
    pids = group.worker_pids
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="rank 1.*exited with code -9"):
            group.execute(cmd.killed_mid_collective)
        assert time.monotonic() - t0 < 30
        with pytest.raises(WorkerError):  # the group stays failed
            group.execute(cmd.collectives)
    finally:
        group.shutdown()
    _assert_no_workers(pids)


def test_worker_exception_is_reported_with_its_traceback():
    group = WorkerGroup(2, worker_num_threads=1)
    group.start()
    pids = group.worker_pids
    try:
        with pytest.raises(WorkerError, match="(?s)rank 1: command failed.*injected failure"):
            group.execute(cmd.raise_on_rank1)
    finally:
        group.shutdown()
    _assert_no_workers(pids)


def test_worker_failing_to_start_raises_quickly():
    t0 = time.monotonic()
    # set_num_threads(0) raises inside the worker only: a start-up failure of rank 1.
    group = WorkerGroup(2, worker_num_threads=0)
    with pytest.raises(WorkerError, match="(?s)rank 1: failed to start.*positive"):
        group.start()
    assert time.monotonic() - t0 < 60
    assert group.worker_pids == [] and _worker_children() == []


def test_worker_dead_while_idle_fails_the_next_command():
    group = WorkerGroup(2, worker_num_threads=1)
    group.start()
    pids = group.worker_pids
    try:
        os.kill(pids[0], 9)
        deadline = time.monotonic() + 10
        with pytest.raises(WorkerError, match="rank 1.*exited"):
            while time.monotonic() < deadline:
                group.check_alive()
                time.sleep(0.05)
        with pytest.raises(WorkerError, match="rank 1"):
            group.execute(cmd.collectives)
    finally:
        group.shutdown()
    _assert_no_workers(pids)


RANK0_SCRIPT = """
import time
from minivllm.distributed import WorkerGroup
group = WorkerGroup(2, worker_num_threads=1)
group.start()
print(*group.worker_pids, flush=True)
time.sleep(60)
"""


def test_workers_exit_when_rank0_is_killed():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    rank0 = subprocess.Popen([sys.executable, "-c", RANK0_SCRIPT], stdout=subprocess.PIPE, env=env,
                             text=True)
    try:
        pids = [int(p) for p in rank0.stdout.readline().split()]
        assert pids
        rank0.send_signal(signal.SIGKILL)
        rank0.wait(10)
        deadline = time.monotonic() + 20
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(p) for p in pids)
    finally:
        rank0.kill()
        rank0.wait(10)
