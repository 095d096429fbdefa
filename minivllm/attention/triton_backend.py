"""Attention backend on our Triton kernels: KV store, split-KV paged decode, varlen prefill."""

from __future__ import annotations

import torch

from minivllm.attention.base import AttentionBackend
from minivllm.attention.metadata import AttentionMetadata
from minivllm.kernels.kv_store import store_kv
from minivllm.kernels.paged_decode import paged_decode_attention
from minivllm.kernels.paged_prefill import paged_prefill_attention


class TritonAttentionBackend(AttentionBackend):
    """Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (float32/float16 only there).

    A pure decode step (``max_query_len == 1``) takes the split-KV decode kernel, whose launch
    depends only on the padded batch and the static ``max_seq_len`` cap (graph-capturable); any
    step with a longer query takes the varlen kernel, which handles decode rows, prefill and
    extend chunks (cached prefix read through the block table) together.

    The object holds no per-step state, so one instance serves every layer and step.
    """

    name = "triton"
    supports_cuda_graphs = True
    compiles_per_shape = True

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
        """Store ``k``/``v`` at ``meta.slot_mapping``, then attend (see ``AttentionBackend``)."""
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.max_query_len <= 1:
            paged_decode_attention(q, k_cache, v_cache, out, meta.seq_lens, meta.query_start_loc,
                                   meta.block_tables, meta.max_seq_len, scale)
        else:
            paged_prefill_attention(q, k_cache, v_cache, out, meta.seq_lens,
                                    meta.query_start_loc, meta.block_tables,
                                    meta.max_query_len, scale)
        return out
