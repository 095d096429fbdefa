"""TP=2 on two gloo ranks (rank 1 spawned): sharded loading equals hand-slicing the checkpoint,
dummy shards equal the sliced TP=1 dummy model, and a model forward over a paged KV cache
(prefill chunks, mixed steps, decodes) gives the TP=1 logits."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import tp_commands as cmd

# llama: GQA 4:2 (one KV head per rank), untied; qwen2: q/k/v bias, 1 KV head (replicated);
# qwen3: q/k norm, 8:2; kv1: q/k norm, 1 KV head, tied head, padded vocabulary shards.
KINDS = ["llama", "qwen2", "qwen3", "kv1"]


@pytest.fixture
def model_dir(request, tiny_model_dirs, qwen3_kv1_dir):
    return qwen3_kv1_dir if request.param == "kv1" else tiny_model_dirs[request.param]


@pytest.mark.parametrize("model_dir", KINDS, indirect=True)
def test_sharded_loading_equals_slicing(tp2, model_dir):
    errors = tp2.execute(cmd.check_sharded_loading, model_dir)
    assert errors == [[], []]


@pytest.mark.parametrize("model_dir", ["qwen2", "kv1"], indirect=True)
def test_dummy_shards_equal_sliced_tp1_dummy(tp2, model_dir):
    assert tp2.execute(cmd.check_dummy_loading, model_dir) == [[], []]


@pytest.mark.parametrize("model_dir", KINDS, indirect=True)
def test_tp2_forward_matches_tp1(tp2, model_dir):
    rank0, rank1 = tp2.execute(cmd.run_steps, model_dir)
    reference = cmd.run_steps(tp2.context, model_dir, tp=False)
    for step, (a, b, ref) in enumerate(zip(rank0, rank1, reference)):
        assert torch.equal(a, b), f"ranks disagree at step {step}"  # gathered: identical
        assert a.shape == ref.shape
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        assert torch.equal(a.argmax(-1), ref.argmax(-1))


def test_collectives(tp2):
    assert tp2.execute(cmd.collectives) == [(3.0, [[0.0, 1.0], [0.0, 1.0]], 5.0)] * 2
