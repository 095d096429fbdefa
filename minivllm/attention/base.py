"""The attention-backend interface: store this step's K/V into the paged cache, then attend.

The store may also happen before ``forward``: a backend that declares
``supports_fused_kv_store`` lets the model write K/V with the kernel that rotates q and k
(``minivllm.kernels.rotary_kv_store``), one launch per layer instead of two, and then passes
``k=v=None`` to ``forward``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from minivllm.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """Paged attention over a block-based KV cache.

    Cache layout (one pair per layer): ``k_cache`` and ``v_cache`` are
    ``[num_blocks, block_size, num_kv_heads, head_dim]``, contiguous. Flat slot ``s``
    is ``(s // block_size, s % block_size)``. They are in the model dtype, or FP8 e4m3 with
    per-layer K and V scales (see ``minivllm.attention.kv_cache``).
    """

    name: str = "base"
    # What the runner may rely on, declared by each backend instead of checked by name:
    # a fixed launch shape for fixed tensor shapes (CUDA-graph capture) ...
    supports_cuda_graphs: bool = False
    # ... and kernels compiled per shape bucket at first use (worth warming up at start-up).
    compiles_per_shape: bool = False
    # KV-cache storage it reads and writes ("auto": the model dtype; "fp8": e4m3 + scales).
    supported_kv_cache_dtypes: tuple[str, ...] = ("auto",)
    # ... and a cache the fused rotary + KV-store kernel may write before ``forward`` (which
    # then gets k=v=None). False keeps the store inside ``forward`` (the torch oracle).
    supports_fused_kv_store: bool = False

    @classmethod
    def check_kv_cache_dtype(cls, kv_cache_dtype: str, device: torch.device) -> None:
        """Raise ValueError (at start-up) unless this backend can run ``kv_cache_dtype`` on
        ``device``."""
        if kv_cache_dtype not in cls.supported_kv_cache_dtypes:
            raise ValueError(f"the {cls.name} attention backend supports kv_cache_dtype "
                             f"{cls.supported_kv_cache_dtypes}, not {kv_cache_dtype!r}")

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write ``k``/``v`` at ``meta.slot_mapping``, then compute causal attention.

        Args:
            q: ``[num_tokens, num_heads, head_dim]``.
            k, v: ``[num_tokens, num_kv_heads, head_dim]`` for this step's new tokens; both
                None when the caller has already written them at ``meta.slot_mapping``
                (allowed only where ``supports_fused_kv_store``; else ValueError).
            k_cache, v_cache: this layer's cache tensors (layout above).
            meta: the step's metadata.
            scale: softmax scale (usually ``head_dim ** -0.5``).
            k_scale, v_scale: for an FP8 cache, its float32 one-element scales (the cache
                holds ``x / scale``); None for a cache in the model dtype.

        Returns:
            ``[num_tokens, num_heads, head_dim]`` in ``q.dtype``; rows past
            ``meta.num_actual_tokens`` are unspecified.
        """

    def check_kv_given(self, k: torch.Tensor | None, v: torch.Tensor | None) -> bool:
        """Whether ``forward`` must store ``k``/``v`` itself (False: the caller stored them).

        Raises:
            ValueError: for only one of them None, or None where this backend does not
                support a store before ``forward``.
        """
        if (k is None) != (v is None):
            raise ValueError("pass both k and v, or neither (already stored in the cache)")
        if k is None and not self.supports_fused_kv_store:
            raise ValueError(f"the {self.name} attention backend stores K/V itself: "
                             "pass k and v")
        return k is not None
