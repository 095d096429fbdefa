"""Attention backends over the paged KV cache."""

from minivllm.attention.base import AttentionBackend
from minivllm.attention.metadata import AttentionMetadata
from minivllm.attention.selector import get_attention_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
