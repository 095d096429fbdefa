"""Fixtures for tensor-parallel tests: one 2-rank gloo WorkerGroup shared by the module's
model tests (spawning costs seconds), and a tiny model with fewer KV heads than ranks."""

from __future__ import annotations

import pytest
import torch

from minivllm.distributed import WorkerGroup


@pytest.fixture(scope="module")
def tp2():
    """Ranks 1 in a spawned process, rank 0 here; shut down after the module."""
    with WorkerGroup(2, worker_num_threads=1) as group:
        yield group


@pytest.fixture(scope="session")
def qwen3_kv1_dir(tmp_path_factory) -> str:
    """Qwen3 with one KV head (replicated on both ranks), q/k norm, a tied head and an odd
    vocabulary (509 rows: the vocabulary shards are padded)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=509, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                      max_position_embeddings=256, initializer_range=0.08, eos_token_id=None,
                      bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(99)
    path = tmp_path_factory.mktemp("tiny-qwen3-kv1")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return str(path)
