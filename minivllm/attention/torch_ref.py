"""Reference attention in plain torch: the oracle every fast backend is tested against.

Works on CPU and CUDA. Clarity over speed: one gather + matmul per request, float32 softmax.
An FP8 cache is quantised on store and dequantised (float32) on read, as the kernels do.
"""

from __future__ import annotations

import torch

from minivllm.attention.base import AttentionBackend
from minivllm.attention.kv_cache import dequantize_fp8, is_fp8, quantize_fp8
from minivllm.attention.metadata import AttentionMetadata


def store_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter new K/V rows into the cache; slots ``< 0`` (padding) are skipped. An FP8 cache
    gets ``sat(x / scale)`` rounded to e4m3."""
    valid = slot_mapping >= 0
    n = slot_mapping.shape[0]
    slots = slot_mapping[valid]
    for rows, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        new = rows[:n][valid]
        if is_fp8(cache):
            if scale is None:
                raise ValueError("an FP8 KV cache needs k_scale and v_scale")
            # CPU has no index_copy_ for float8: copy the bytes.
            cache.view(torch.uint8).view(-1, *cache.shape[2:]).index_copy_(
                0, slots, quantize_fp8(new, scale).view(torch.uint8))
        else:
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, new.to(cache.dtype))


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
    """Pads the batch to ``[num_seqs, max_query_len]`` queries over ``[num_seqs, max_seq_len]``
    keys gathered through the block tables, and attends in float32 with one masked matmul.

    Whole-batch tensors instead of a loop per request: the engine's CPU tests spend most of
    their time here. ``attend_reference`` above is the per-request form used by kernel tests.
    """

    name = "torch"

    supported_kv_cache_dtypes = ("auto", "fp8")

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None):
        self.check_kv_given(k, v)  # the oracle always stores K/V itself
        store_kv_reference(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
        num_seqs, max_q = meta.num_seqs, meta.max_query_len
        # max_seq_len may be a static cap (CUDA graphs); no request reaches past its block table.
        max_len = min(meta.max_seq_len, meta.block_tables.shape[1] * block_size)
        num_heads, head_dim = q.shape[1], q.shape[2]
        group = num_heads // num_kv_heads
        dev = q.device

        key_pos = torch.arange(max_len, device=dev)
        slots = (meta.block_tables[:, key_pos // block_size].long() * block_size
                 + key_pos % block_size)  # [B, L]
        keys = k_cache.view(-1, num_kv_heads, head_dim)[slots].float()  # [B, L, Hkv, D]
        values = v_cache.view(-1, num_kv_heads, head_dim)[slots].float()
        if is_fp8(k_cache):  # dequantise: the cache holds x / scale
            keys, values = dequantize_fp8(keys, k_scale), dequantize_fp8(values, v_scale)

        qsl = meta.query_start_loc.long()
        q_lens = qsl[1:] - qsl[:-1]
        n = meta.num_actual_tokens
        pure_decode = max_q == 1 and n == num_seqs  # token i is request i: no scatter needed
        if pure_decode:
            q_pad = q[:n].float().view(num_seqs, 1, num_heads, head_dim)
        else:
            token_req = torch.repeat_interleave(torch.arange(num_seqs, device=dev), q_lens, output_size=n)
            token_idx = torch.arange(n, device=dev) - qsl[token_req]
            q_pad = q.new_zeros((num_seqs, max_q, num_heads, head_dim), dtype=torch.float32)
            q_pad[token_req, token_idx] = q[:n].float()

        # [B, Hkv, G*Qmax, D] @ [B, Hkv, D, L]: each KV head serves its group of query heads.
        q_grp = q_pad.view(num_seqs, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        q_grp = q_grp.reshape(num_seqs, num_kv_heads, group * max_q, head_dim)
        scores = torch.matmul(q_grp, keys.permute(0, 2, 3, 1)) * scale
        scores = scores.view(num_seqs, num_kv_heads, group, max_q, max_len)
        q_pos = (meta.seq_lens.long() - q_lens)[:, None] + torch.arange(max_q, device=dev)  # [B, Qmax]
        visible = key_pos[None, None, :] <= q_pos[:, :, None]  # causal; also hides padding keys
        scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(num_seqs, num_kv_heads, group * max_q, max_len)
        out = torch.matmul(probs, values.permute(0, 2, 1, 3))  # [B, Hkv, G*Qmax, D]
        out = out.view(num_seqs, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
        out = out.reshape(num_seqs, max_q, num_heads, head_dim)
        result = torch.zeros_like(q)
        result[:n] = (out.view(num_seqs, num_heads, head_dim) if pure_decode
                      else out[token_req, token_idx]).to(q.dtype)
        return result
