"""Vocabulary-parallel token embedding and LM head.

Each rank holds a contiguous block of vocabulary rows. The embedding looks up the ids in its
block, zeroes the others and all-reduces (exactly one rank contributes each row, so the sum is
exact). The LM head computes logits for its block and all-gathers them to the full vocabulary:
rank 0 samples from full logits. A tied head uses the embedding's (identically sharded) weight.

With ``tp_group=None`` both are the plain single-device computations, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.distributed.group import TensorParallelGroup, tp_rank_and_size
from minivllm.distributed.sharding import vocab_shard
from minivllm.layers.dense import dense_linear
from minivllm.layers.weight_loading import WeightSource, check_shape, read_range


class VocabParallelEmbedding(nn.Module):
    """``[T]`` token ids → ``[T, hidden]`` embeddings, vocabulary rows split over ranks."""

    def __init__(self, vocab_size: int, hidden_size: int,
                 tp_group: TensorParallelGroup | None = None) -> None:
        super().__init__()
        rank, size = tp_rank_and_size(tp_group)
        self.tp = tp_group if size > 1 else None
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.vocab_start, self.vocab_end, rows = vocab_shard(vocab_size, size, rank)
        # Zeros: padding rows (when the vocabulary does not divide) are never loaded and must
        # give zero logits before they are cut off.
        init = torch.zeros if rows > self.vocab_end - self.vocab_start else torch.empty
        self.weight = nn.Parameter(init(rows, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_shard, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight).masked_fill_(~in_shard.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)

    def full_shape(self, param_name: str) -> tuple[int, ...]:
        return (self.vocab_size, self.hidden_size)

    def load_weight(self, param_name: str, src: WeightSource, shard_id: int | None = None) -> None:
        if shard_id is not None:
            raise ValueError(f"vocabulary-parallel {param_name} has no parts (got part {shard_id})")
        check_shape(src, self.full_shape(param_name), "vocabulary weight")
        n = self.vocab_end - self.vocab_start
        self.weight.data[:n].copy_(read_range(src, 0, self.vocab_start, n))


class ParallelLMHead(VocabParallelEmbedding):
    """An untied LM head: the same row split as the embedding; used through :func:`lm_logits`."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - guard
        raise RuntimeError("ParallelLMHead is applied with lm_logits(hidden, head.weight, ...)")


def lm_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int,
              tp_group: TensorParallelGroup | None) -> torch.Tensor:
    """Full-vocabulary float32 logits ``[T, vocab_size]`` on every rank.

    ``weight`` is this rank's block of vocabulary rows (embedding or LM head). Gathered in the
    model dtype (half the bytes of float32), then widened, as the single-device path does.
    """
    # One row (batch-1 decode) takes the GEMV: the LM head is the largest single weight read
    # of a step (311 MB on Qwen3-0.6B: 114 µs in cuBLAS, 101 µs in the GEMV on an H100).
    logits = dense_linear(hidden, weight)
    if tp_group is not None and tp_group.world_size > 1:
        logits = tp_group.all_gather(logits, dim=-1)
        if logits.shape[-1] != vocab_size:
            logits = logits[..., :vocab_size].contiguous()
    return logits.float()
