"""The attention-backend interface: store this step's K/V into the paged cache, then attend."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from minivllm.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """Paged attention over a block-based KV cache.

    Cache layout (one pair per layer): ``k_cache`` and ``v_cache`` are
    ``[num_blocks, block_size, num_kv_heads, head_dim]``, contiguous. Flat slot ``s``
    is ``(s // block_size, s % block_size)``.
    """

    name: str = "base"
    # What the runner may rely on, declared by each backend instead of checked by name:
    # a fixed launch shape for fixed tensor shapes (CUDA-graph capture) ...
    supports_cuda_graphs: bool = False
    # ... and kernels compiled per shape bucket at first use (worth warming up at start-up).
    compiles_per_shape: bool = False

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Write ``k``/``v`` at ``meta.slot_mapping``, then compute causal attention.

        Args:
            q: ``[num_tokens, num_heads, head_dim]``.
            k, v: ``[num_tokens, num_kv_heads, head_dim]`` for this step's new tokens.
            k_cache, v_cache: this layer's cache tensors (layout above).
            meta: the step's metadata.
            scale: softmax scale (usually ``head_dim ** -0.5``).

        Returns:
            ``[num_tokens, num_heads, head_dim]`` in ``q.dtype``; rows past
            ``meta.num_actual_tokens`` are unspecified.
        """
