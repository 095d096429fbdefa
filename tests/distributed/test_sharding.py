"""Tensor-parallel arithmetic and TP=1 layer behaviour, in one process (no ranks needed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minivllm.config import ModelArchConfig
from minivllm.distributed.init import init_distributed, rank_from_env
from minivllm.distributed.sharding import (check_tensor_parallel, first_kv_head, kv_heads_per_rank,
                                           vocab_shard)
from minivllm.layers.linear import ColumnParallelLinear, RowParallelLinear
from minivllm.layers.vocab_embedding import VocabParallelEmbedding, lm_logits


def test_kv_heads_split_or_replicate():
    assert [kv_heads_per_rank(8, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert kv_heads_per_rank(2, 4) == 1 and kv_heads_per_rank(1, 8) == 1
    # 2 KV heads over 4 ranks: ranks 0,1 keep head 0; ranks 2,3 keep head 1.
    assert [first_kv_head(2, 4, r) for r in range(4)] == [0, 0, 1, 1]
    assert [first_kv_head(8, 4, r) for r in range(4)] == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="num_key_value_heads"):
        kv_heads_per_rank(6, 4)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        kv_heads_per_rank(3, 4)


def test_vocab_shards_cover_the_vocabulary_with_equal_padded_sizes():
    shards = [vocab_shard(509, 4, r) for r in range(4)]
    assert [(s, e) for s, e, _ in shards] == [(0, 128), (128, 256), (256, 384), (384, 509)]
    assert {per for *_, per in shards} == {128}


def test_check_tensor_parallel_names_the_dimension():
    arch = ModelArchConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 6,
        "num_key_value_heads": 2})
    check_tensor_parallel(arch, 2)
    with pytest.raises(ValueError, match="num_attention_heads"):
        check_tensor_parallel(arch, 4)
    with pytest.raises(ValueError, match="must be >= 1"):
        check_tensor_parallel(arch, 0)


def test_tp1_layers_compute_what_nn_modules_compute():
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    ref = nn.Linear(16, 24, bias=True)
    for layer in (ColumnParallelLinear(16, 24, True), RowParallelLinear(16, 24, True)):
        layer.load_weight("weight", ref.weight.data)
        layer.load_weight("bias", ref.bias.data)
        assert torch.equal(layer(x), ref(x))
    emb = nn.Embedding(50, 16)
    ours = VocabParallelEmbedding(50, 16)
    ours.load_weight("weight", emb.weight.data)
    ids = torch.tensor([0, 49, 7])
    assert torch.equal(ours(ids), emb(ids))
    assert torch.equal(lm_logits(x, ours.weight, 50, None), torch.matmul(x, emb.weight.t()).float())


def test_rendezvous_from_torchrun_environment(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert rank_from_env() is None
    with pytest.raises(ValueError, match="torchrun"):
        init_distributed()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29512")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert rank_from_env() == (1, 2, 0)
    with pytest.raises(ValueError, match="outside"):
        init_distributed(3, 2)
