"""Reference attention in plain torch: the oracle every fast backend is tested against.

Works on CPU and CUDA. Clarity over speed: one gather + matmul per request, float32 softmax.
"""

from __future__ import annotations

import torch

from minivllm.attention.base import AttentionBackend
from minivllm.attention.metadata import AttentionMetadata


def store_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new K/V rows into the cache; slots ``< 0`` (padding) are skipped."""
    valid = slot_mapping >= 0
    n = slot_mapping.shape[0]
    slots = slot_mapping[valid]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k.index_copy_(0, slots, k[:n][valid].to(k_cache.dtype))
    flat_v.index_copy_(0, slots, v[:n][valid].to(v_cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` cached rows of one request, ``[seq_len, num_kv_heads, head_dim]``."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    rows = cache[block_table[:num_blocks].long()]  # [nb, bs, hkv, d]
    return rows.reshape(-1, *cache.shape[2:])[:seq_len]


def attend_reference(
    q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Causal attention of ``q`` (the last ``len(q)`` positions) over ``k_ctx``/``v_ctx``.

    q: ``[nq, H, D]``; k_ctx/v_ctx: ``[L, Hkv, D]`` with ``L >= nq``. Computed in float32.
    """
    nq, num_heads, _ = q.shape
    ctx_len, num_kv_heads, _ = k_ctx.shape
    group = num_heads // num_kv_heads
    qf = q.float().transpose(0, 1)  # [H, nq, D]
    kf = k_ctx.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
    vf = v_ctx.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [H, nq, L]
    q_pos = torch.arange(ctx_len - nq, ctx_len, device=q.device)[:, None]
    k_pos = torch.arange(ctx_len, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).transpose(0, 1).to(q.dtype)  # [nq, H, D]


class TorchReferenceBackend(AttentionBackend):
    """Gathers each request's context through its block table and attends in float32."""

    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        store_kv_reference(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.zeros_like(q)
        qsl = meta.query_start_loc_cpu.tolist()
        seq_lens = meta.seq_lens_cpu.tolist()
        for i, seq_len in enumerate(seq_lens):
            start, end = qsl[i], qsl[i + 1]
            if end == start:
                continue
            k_ctx = gather_context(k_cache, meta.block_tables[i], seq_len)
            v_ctx = gather_context(v_cache, meta.block_tables[i], seq_len)
            out[start:end] = attend_reference(q[start:end], k_ctx, v_ctx, scale)
        return out
