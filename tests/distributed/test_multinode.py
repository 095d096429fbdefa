"""Tensor parallelism across hosts, simulated on loopback: the engine (node 0) with NNODES,
MASTER_ADDR and MASTER_PORT in its environment, and `minivllm worker` (node 1) started as a
separate process with its own flags, as a user would on a second machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minivllm import LLM, SamplingParams
from minivllm.distributed import WorkerError, WorkerGroup
from minivllm.distributed.nodes import NodeLayout
from tests.conftest import random_prompts
from tests.distributed import tp_commands as cmd

ROOT = str(Path(__file__).resolve().parents[2])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node1(port: int, from_env: bool = False) -> subprocess.Popen:
    """`minivllm worker` for node 1 of 2, in a clean environment (nothing inherited from node 0),
    configured by flags or, ``from_env``, by the variables alone."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = ROOT
    layout = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if from_env:
        env.update(layout)
        flags = []
    else:
        flags = [x for k, v in layout.items() for x in (f"--{k.lower().replace('_', '-')}", v)]
    return subprocess.Popen([sys.executable, "-m", "minivllm", "worker", *flags, "--num-threads", "1",
                             "--connect-timeout", "60"], env=env, stderr=subprocess.PIPE, text=True)


def _ranks_of(agent_pid: int) -> list[int]:
    """Pids of the rank processes `minivllm worker` started (Linux /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == agent_pid and b"run_from_env" in cmdline:
            found.append(int(entry))
    return found


def _wait_for_ranks(agent: subprocess.Popen, n: int, timeout_s: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = _ranks_of(agent.pid)
        if len(pids) == n:
            return pids
        assert agent.poll() is None, agent.stderr.read()
        time.sleep(0.1)
    raise AssertionError("node 1 did not start its ranks")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_two_hosts_greedy_equals_tp1_and_shut_down_cleanly(tiny_model_dirs, monkeypatch):
    model_dir = tiny_model_dirs["llama"]
    prompts = random_prompts([3, 21, 40], seed=21)
    params = SamplingParams(temperature=0, max_tokens=8)
    kw = dict(device="cpu", block_size=16, max_num_batched_tokens=32)  # chunked prefill too
    llm = LLM(model_dir, **kw)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.engine.shutdown()

    port = _free_port()
    node1 = _start_node1(port, from_env=True)  # before the engine: it waits for the rendezvous
    try:
        monkeypatch.setenv("NNODES", "2")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        llm = LLM(model_dir, tensor_parallel_size=2, **kw)
        try:
            assert llm.engine.executor.workers.worker_pids == []  # rank 1 lives on "node 1"
            ranks = _wait_for_ranks(node1, 1)
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.engine.shutdown()
        assert got == want
        assert node1.wait(30) == 0, node1.stderr.read()
        assert all(_gone(p) for p in ranks)
    finally:
        _stop(node1)


def test_rank_on_another_host_killed_fails_the_command():
    port = _free_port()
    node1 = _start_node1(port)
    group = WorkerGroup(2, worker_num_threads=1, nodes=NodeLayout(2, "127.0.0.1", port))
    try:
        group.start()
        assert group.execute(cmd.collectives)[1] == (3.0, [[0.0, 1.0], [0.0, 1.0]], 5.0)
        (rank1,) = _ranks_of(node1.pid)
        os.kill(rank1, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="another host"):
            group.execute(cmd.collectives)
        assert time.monotonic() - t0 < 20
        assert node1.wait(20) == 128 + signal.SIGKILL  # the agent reports its rank's death
    finally:
        group.shutdown()
        _stop(node1)


RANK0_SCRIPT = """
import sys, time
from minivllm.distributed import WorkerGroup
from minivllm.distributed.nodes import NodeLayout
group = WorkerGroup(2, worker_num_threads=1, nodes=NodeLayout(2, "127.0.0.1", int(sys.argv[1])))
group.start()
print("ready", flush=True)
time.sleep(60)
"""


def test_ranks_on_another_host_exit_when_the_engine_dies():
    port = _free_port()
    node1 = _start_node1(port)
    rank0 = subprocess.Popen([sys.executable, "-c", RANK0_SCRIPT, str(port)], stdout=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=ROOT), text=True)
    try:
        assert rank0.stdout.readline().strip() == "ready"
        ranks = _ranks_of(node1.pid)
        assert ranks
        rank0.send_signal(signal.SIGKILL)
        assert node1.wait(20) != 0  # no "shutdown" came: the ranks saw the engine vanish
        assert all(_gone(p) for p in ranks)
    finally:
        _stop(rank0)
        _stop(node1)


def test_layout_from_the_environment():
    assert NodeLayout.from_env({}) is None
    assert NodeLayout.from_env({"NNODES": "1", "MASTER_ADDR": "h"}) is None
    nodes = NodeLayout.from_env({"NNODES": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert nodes == NodeLayout(2, "10.0.0.1", 29500)
    assert list(nodes.node_ranks(1, 4)) == [2, 3]
    with pytest.raises(ValueError, match="MASTER_PORT"):
        NodeLayout.from_env({"NNODES": "2", "MASTER_ADDR": "h"})
    with pytest.raises(ValueError, match="node 0"):
        NodeLayout.from_env({"NNODES": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "NODE_RANK": "1"})
    with pytest.raises(ValueError, match="NNODES must be an integer"):
        NodeLayout.from_env({"NNODES": "two"})
    with pytest.raises(ValueError, match="split evenly"):
        nodes.ranks_per_node(3)


def test_worker_cli_errors(capsys, monkeypatch):
    from minivllm.entrypoints.cli import main

    for var in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert main(["worker"]) == 2
    assert "missing --master-addr, --master-port, --nnodes, --node-rank" in capsys.readouterr().err
    flags = ["worker", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", "1"]
    assert main([*flags, "--node-rank", "0"]) == 2
    assert "node 0 runs the engine" in capsys.readouterr().err
    assert main([*flags, "--node-rank", "2"]) == 2
    assert "outside 1..1" in capsys.readouterr().err
    monkeypatch.setenv("NNODES", "two")
    assert main(["worker"]) == 2
    assert "NNODES='two' is not an integer" in capsys.readouterr().err
