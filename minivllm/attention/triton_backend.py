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
    Reads and writes an FP8 (e4m3) cache too: quantised on store, dequantised in registers.

    A pure decode step (``max_query_len == 1``) takes the split-KV decode kernel, whose launch
    depends only on the padded batch and the static ``max_seq_len`` cap (graph-capturable); any
    step with a longer query takes the varlen kernel, which handles decode rows, prefill and
    extend chunks (cached prefix read through the block table) together.

    The object holds no per-step state, so one instance serves every layer and step.
    """

    name = "triton"
    supports_cuda_graphs = True
    compiles_per_shape = True
    supported_kv_cache_dtypes = ("auto", "fp8")
    supports_fused_kv_store = True  # the cache layout rotary_kv_store writes

    @classmethod
    def check_kv_cache_dtype(cls, kv_cache_dtype: str, device: torch.device) -> None:
        super().check_kv_cache_dtype(kv_cache_dtype, device)
        # Triton converts float8e4nv only on sm_89+ (Ada, Hopper); the interpreter does too.
        if kv_cache_dtype == "fp8" and device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            if (major, minor) < (8, 9):
                raise ValueError(f"kv_cache_dtype='fp8' with the Triton backend needs compute "
                                 f"capability 8.9+ (this GPU: {major}.{minor}); use "
                                 f"kv_cache_dtype='auto' or attention_backend='torch'")

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
        """Store ``k``/``v`` at ``meta.slot_mapping`` (unless None: stored already), then
        attend (see ``AttentionBackend``). The attention kernels run after the store in the
        stream, so they read this step's K/V from the cache either way."""
        if self.check_kv_given(k, v):
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.max_query_len <= 1:
            paged_decode_attention(q, k_cache, v_cache, out, meta.seq_lens, meta.query_start_loc,
                                   meta.block_tables, meta.max_seq_len, scale,
                                   k_scale=k_scale, v_scale=v_scale)
        else:
            paged_prefill_attention(q, k_cache, v_cache, out, meta.seq_lens,
                                    meta.query_start_loc, meta.block_tables,
                                    meta.max_query_len, scale, k_scale=k_scale, v_scale=v_scale)
        return out
