"""Tiny random pooling models built with HF transformers (no hub): sequence classifiers of each
family and a Qwen3 embedding model (a bare ``Qwen3Model``, what ``AutoModel`` saves)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_VOCAB

# Small blocks and token budget, so the test prompts span several blocks and chunks.
ENGINE_ARGS = dict(device="cpu", max_num_batched_tokens=64, block_size=16, num_kv_blocks=64)


def _config(kind: str):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  max_position_embeddings=256, initializer_range=0.08, eos_token_id=None, bos_token_id=None)
    if kind == "qwen2":  # 3 named labels, q/k/v bias
        return Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=1,
                           id2label={0: "neg", 1: "neutral", 2: "pos"}, label2id={"neg": 0, "neutral": 1, "pos": 2})
    if kind == "llama":  # HF's default 2 labels (LABEL_0, LABEL_1), not written to config.json
        return LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2)
    if kind in ("qwen3", "qwen3_embed"):  # per-head q/k norm; a single label: sigmoid
        return Qwen3Config(**common, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                           num_labels=1 if kind == "qwen3" else 2)
    raise ValueError(kind)


@pytest.fixture(scope="session")
def classifier_dirs(tmp_path_factory) -> dict[str, str]:
    from transformers import AutoModelForSequenceClassification

    dirs = {}
    for i, kind in enumerate(("qwen2", "llama", "qwen3")):
        torch.manual_seed(99 + i)
        path = tmp_path_factory.mktemp(f"cls-{kind}")
        AutoModelForSequenceClassification.from_config(_config(kind)).save_pretrained(path)
        dirs[kind] = str(path)
    return dirs


@pytest.fixture(scope="session")
def hf_classifiers(classifier_dirs):
    from transformers import AutoModelForSequenceClassification

    return {k: AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32).eval()
            for k, d in classifier_dirs.items()}


@pytest.fixture(scope="session")
def embed_dir(tmp_path_factory) -> str:
    from transformers import AutoModel

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("embed-qwen3")
    AutoModel.from_config(_config("qwen3_embed")).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def hf_embedder(embed_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(embed_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def embed_llm(embed_dir):
    from minivllm import LLM

    return LLM(embed_dir, **ENGINE_ARGS)
