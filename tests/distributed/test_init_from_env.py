"""Rendezvous from torchrun's environment variables: two plain processes, no WorkerGroup."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

SCRIPT = """
import torch
from minivllm.distributed import destroy_distributed, init_distributed
tp = init_distributed()  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK from the env
t = tp.all_reduce(torch.tensor([tp.rank + 1.0]))
print(tp.rank, tp.world_size, t.item(), flush=True)
destroy_distributed()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_rendezvous_from_torchrun_variables():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=root, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT], env=env,
                                      stdout=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=120)[0].split() for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [["0", "2", "3.0"], ["1", "2", "3.0"]]
