"""Attention layer: head bookkeeping around a pluggable paged-attention backend."""

from __future__ import annotations

import torch
from torch import nn

from minivllm.attention.base import AttentionBackend
from minivllm.attention.kv_cache import LayerKVCache, calculate_kv_scales
from minivllm.attention.metadata import AttentionMetadata


class PagedAttention(nn.Module):
    """Reshapes flat q/k/v into heads and hands them, with this layer's cache, to the backend."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                kv_cache: LayerKVCache, meta: AttentionMetadata) -> torch.Tensor:
        """q: ``[T, Hq, D]``, k/v: ``[T, Hkv, D]`` → ``[T, Hq * D]``.

        ``k=v=None``: this step's K/V are already in ``kv_cache`` (written by the fused rotary
        + KV-store kernel; only for a backend with ``supports_fused_kv_store``).
        """
        if meta.calculate_kv_scales:
            if k is None or v is None:
                raise ValueError("a calculate_kv_scales step needs k and v: the scales come "
                                 "from them before they are stored")
            n = meta.num_actual_tokens
            calculate_kv_scales(k[:n], v[:n], kv_cache)
        out = self.backend.forward(q, k, v, kv_cache.k, kv_cache.v, meta, self.scale,
                                   kv_cache.k_scale, kv_cache.v_scale)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
