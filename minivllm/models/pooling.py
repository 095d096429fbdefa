"""Pooling variants of the decoders: sequence classifiers and embedding models.

Both run the causal decoder unchanged and drop the LM head. ``pooler_head`` maps pooled hidden
states ``[N, hidden]`` (see ``pooling/pooler.py``) to what the request gets back: class logits
through the ``score`` projection (HF's ``*ForSequenceClassification``), or the hidden state
itself (HF's bare ``*Model``, Qwen3-Embedding).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from minivllm.attention.base import AttentionBackend
from minivllm.config import ModelArchConfig
from minivllm.distributed.group import TensorParallelGroup
from minivllm.layers.quantization.base import LinearMethod
from minivllm.layers.weight_loading import WeightSource
from minivllm.models.llama import LlamaForCausalLM
from minivllm.models.qwen2 import Qwen2ForCausalLM
from minivllm.models.qwen3 import Qwen3ForCausalLM

# Checkpoint tensors an embedding model ignores: heads of the model it was packaged as.
_HEAD_TENSORS = ("lm_head.weight", "score.weight")


class _EmbeddingModel:
    """Mixin: the decoder without a head; the pooled hidden state is the embedding."""

    has_lm_head = False

    def pooler_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled.float()

    def load_weights(self, weights: Iterable[tuple[str, WeightSource]]) -> set[str]:
        return super().load_weights((n, w) for n, w in weights if n not in _HEAD_TENSORS)


class _ClassifierModel:
    """Mixin: the decoder with HF's ``score`` projection (hidden → labels, no bias)."""

    has_lm_head = False

    def __init__(self, cfg: ModelArchConfig, backend: AttentionBackend, max_position: int,
                 tp_group: TensorParallelGroup | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        super().__init__(cfg, backend, max_position, tp_group=tp_group,
                         linear_method=linear_method)
        if not cfg.id2label:
            raise ValueError(f"{cfg.architecture} needs the number of labels (id2label) in config.json")
        # Replicated on every tensor-parallel rank: the pooled hidden states are full there.
        self.score = nn.Linear(cfg.hidden_size, len(cfg.id2label), bias=False)

    def pooler_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.score(pooled).float()


class LlamaModel(_EmbeddingModel, LlamaForCausalLM):
    """Llama decoder as an embedding model."""


class Qwen2Model(_EmbeddingModel, Qwen2ForCausalLM):
    """Qwen2 decoder as an embedding model."""


class Qwen3Model(_EmbeddingModel, Qwen3ForCausalLM):
    """Qwen3 decoder as an embedding model (Qwen3-Embedding)."""


class LlamaForSequenceClassification(_ClassifierModel, LlamaForCausalLM):
    """Llama decoder with a classification head."""


class Qwen2ForSequenceClassification(_ClassifierModel, Qwen2ForCausalLM):
    """Qwen2 decoder with a classification head."""


class Qwen3ForSequenceClassification(_ClassifierModel, Qwen3ForCausalLM):
    """Qwen3 decoder with a classification head."""


def architecture_for_task(architecture: str, task: str) -> str:
    """The architecture the engine builds for ``task`` from a checkpoint of ``architecture``.

    A causal LM or a classifier serves ``embed`` as its bare decoder (``Qwen3ForCausalLM`` →
    ``Qwen3Model``: Qwen3-Embedding ships as the former); anything else must match the task.

    Raises:
        ValueError: the checkpoint cannot serve ``task`` (e.g. ``classify`` without a score head).
    """
    family, _, kind = architecture.partition("For")
    if task == "embed":
        return architecture if not kind else f"{family}Model"
    wanted = {"generate": "CausalLM", "classify": "SequenceClassification"}[task]
    if kind != wanted:
        raise ValueError(f"task={task!r} needs a *For{wanted} model; this checkpoint is {architecture}")
    return architecture
