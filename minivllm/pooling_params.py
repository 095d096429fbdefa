"""PoolingParams: what a classify / embed request asks of the pooled hidden state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

POOLING_TYPES = ("last", "mean")


@dataclass(frozen=True)
class PoolingParams:
    """Per-request pooling settings (validated on construction; ValueError on bad values).

    ``pooling_type``: ``"last"`` (the last prompt token's hidden state: what HF's
    ``*ForSequenceClassification`` and Qwen3-Embedding use) or ``"mean"`` (the average over
    every prompt token); ``None`` takes the model's default (its sentence-transformers pooling
    config when it ships one, else ``"last"``).
    ``normalize``: embeddings are L2-normalised (embed models only).
    ``activation``: class scores go through softmax (sigmoid for a single label); ``False``
    returns the raw logits (classify models only).
    ``truncate_prompt_tokens``: keep only the last k prompt tokens (``-1``: the last
    ``max_model_len``); ``None`` rejects a prompt that does not fit.
    """

    pooling_type: str | None = None
    normalize: bool = True
    activation: bool = True
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.pooling_type is not None and self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {POOLING_TYPES} or None, got {self.pooling_type!r}")
        for name in ("normalize", "activation"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        t = self.truncate_prompt_tokens
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or (t < 1 and t != -1)):
            raise ValueError(f"truncate_prompt_tokens must be a positive integer, -1 or None, got {t!r}")

    def to_wire(self) -> dict[str, Any]:
        return {"pooling_type": self.pooling_type, "normalize": self.normalize,
                "activation": self.activation, "truncate_prompt_tokens": self.truncate_prompt_tokens}

    @classmethod
    def from_wire(cls, fields: dict[str, Any] | None) -> PoolingParams | None:
        return None if fields is None else cls(**fields)
