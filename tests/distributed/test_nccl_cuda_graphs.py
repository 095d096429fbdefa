"""NCCL all-reduces inside a captured CUDA graph (needs 2 CUDA devices; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from minivllm.distributed import WorkerGroup
from tests.distributed import tp_commands as cmd

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


def test_decode_graph_with_nccl_all_reduce_matches_eager(tiny_model_dirs):
    with WorkerGroup(2, device_type="cuda") as group:
        results = group.execute(cmd.decode_graph_vs_eager, tiny_model_dirs["qwen3_hd64"])
    for graph_err, tp_err in results:
        assert graph_err == 0.0  # same kernels, same order: replay is bit-identical
        assert tp_err < 0.1  # bf16: TP sums partial products in another order than TP=1
