"""Two "hosts" on one machine with two GPUs (each sees one through CUDA_VISIBLE_DEVICES): NCCL
across them, every rank on its local cuda:0. Skipped without 2 CUDA devices."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.distributed.test_multinode import ROOT, _free_port, _stop

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")

ENGINE = """
import json, sys
from minivllm import LLM, SamplingParams
from tests.conftest import random_prompts
llm = LLM(sys.argv[1], device="cuda", dtype="float32", tensor_parallel_size=2, seed=0)
outs = llm.generate(random_prompts([5, 33, 70], seed=3), SamplingParams(temperature=0, max_tokens=16),
                    use_tqdm=False)
llm.engine.shutdown()
print(json.dumps([o.outputs[0].token_ids for o in outs]))
"""


def _engine(model_dir: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ENGINE, model_dir], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT, **env))


def test_two_nodes_nccl_equals_one_node(tiny_model_dirs):
    model_dir = tiny_model_dirs["qwen3_hd64"]
    one_host = _engine(model_dir)
    want = one_host.communicate(timeout=300)[0].strip().splitlines()[-1]
    assert one_host.returncode == 0

    port = _free_port()
    node1 = subprocess.Popen([sys.executable, "-m", "minivllm", "worker", "--nnodes", "2", "--node-rank", "1",
                              "--master-addr", "127.0.0.1", "--master-port", str(port)],
                             env=dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="1"))
    node0 = _engine(model_dir, CUDA_VISIBLE_DEVICES="0", NNODES="2", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port))
    try:
        got = node0.communicate(timeout=300)[0].strip().splitlines()[-1]
        assert node0.returncode == 0
        assert node1.wait(60) == 0
    finally:
        _stop(node0)
        _stop(node1)
    # Two-rank all-reduces sum two operands: the same result whatever the transport.
    assert got == want
