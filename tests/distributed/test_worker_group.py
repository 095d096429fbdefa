"""WorkerGroup life cycle: clean shutdown, and every kind of worker failure surfacing in rank 0
as a WorkerError within seconds (never a hang), with no process left behind."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from minivllm.distributed import WorkerError, WorkerGroup
from tests.distributed import tp_commands as cmd


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _assert_no_workers(pids: list[int]) -> None:
    assert pids and all(_gone(p) for p in pids)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("minivllm-tp")]


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
    assert group.worker_pids == [] and not multiprocessing.active_children()


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
