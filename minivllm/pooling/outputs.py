"""What classify() / embed() / score() return: vLLM-shaped pooling request outputs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EmbeddingOutput:
    """One prompt's embedding (L2-normalised unless the request said otherwise)."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    """One prompt's class probabilities (raw logits with ``activation=False``), in label
    order; ``label`` names the most likely class, ``labels`` every class (``id2label``)."""

    probs: list[float]
    label: str
    labels: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    """Cosine similarity of two prompts' embeddings."""

    score: float


@dataclass
class PoolingRequestOutput:
    """Result of one pooling request. ``outputs`` is an Embedding/Classification/ScoringOutput;
    ``num_cached_tokens`` counts prompt tokens served from the prefix cache."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput | ClassificationOutput | ScoringOutput
    finished: bool = True
    num_cached_tokens: int = 0


class EmbeddingRequestOutput(PoolingRequestOutput):
    """``outputs.embedding``."""


class ClassificationRequestOutput(PoolingRequestOutput):
    """``outputs.probs`` and ``outputs.label``."""


class ScoringRequestOutput(PoolingRequestOutput):
    """``outputs.score``; ``prompt_token_ids`` are those of both prompts, concatenated."""
