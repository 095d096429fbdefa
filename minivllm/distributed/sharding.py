"""How a model's dimensions split over tensor-parallel ranks: pure arithmetic, no torch.distributed.

The runner sizes its KV cache from :func:`kv_heads_per_rank`; the engine can call
:func:`check_tensor_parallel` before it starts any process, so a model that does not split
fails with a clear message instead of a shape error inside a worker.
"""

from __future__ import annotations

from minivllm.config import ModelArchConfig


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator // denominator``, raising ValueError naming ``what`` if it does not divide."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size "
                         f"({denominator})")
    return numerator // denominator


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads one rank holds: an equal share, or 1 (replicated) when there are fewer heads
    than ranks.

    Raises:
        ValueError: when neither count divides the other.
    """
    if num_kv_heads >= tp_size:
        return divide(num_kv_heads, tp_size, "num_key_value_heads")
    if tp_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({tp_size}) must be a multiple of "
                         f"num_key_value_heads ({num_kv_heads}) when it is larger")
    return 1


def first_kv_head(num_kv_heads: int, tp_size: int, tp_rank: int) -> int:
    """Index of the first KV head rank ``tp_rank`` holds.

    With replication, rank ``r`` keeps the head its query heads attend with: query heads are
    split in contiguous blocks, so ``tp_size // num_kv_heads`` neighbouring ranks share a head.
    """
    if num_kv_heads >= tp_size:
        return tp_rank * (num_kv_heads // tp_size)
    return tp_rank // (tp_size // num_kv_heads)


def vocab_shard(vocab_size: int, tp_size: int, tp_rank: int) -> tuple[int, int, int]:
    """``(start, end, rows_per_rank)`` of this rank's vocabulary rows.

    Every rank holds ``ceil(vocab_size / tp_size)`` rows (the last ones padded with zeros where
    the vocabulary does not divide) so that the logits all-gather has equal sizes.
    """
    per_rank = -(-vocab_size // tp_size)
    start = min(tp_rank * per_rank, vocab_size)
    return start, min(start + per_rank, vocab_size), per_rank


def check_tensor_parallel(arch: ModelArchConfig, tp_size: int) -> None:
    """Raise ValueError unless ``arch`` splits evenly over ``tp_size`` ranks."""
    if tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp_size}")
    divide(arch.num_attention_heads, tp_size, "num_attention_heads")
    divide(arch.intermediate_size, tp_size, "intermediate_size")
    kv_heads_per_rank(arch.num_key_value_heads, tp_size)


def kv_cache_heads_per_rank(arch: ModelArchConfig, tp_size: int) -> int:
    """KV heads in one rank's cache for ``arch`` (the same on every rank)."""
    return kv_heads_per_rank(arch.num_key_value_heads, tp_size)
