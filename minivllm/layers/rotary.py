"""Rotary position embedding (HF "rotate half" layout), with llama3 / linear rope scaling.

On CUDA, q and k are rotated by one Triton kernel, which can also apply Qwen3's per-head q/k
RMSNorm first; elsewhere the torch code below runs, the reference the kernel is tested against.
``forward_and_store_kv`` goes one step further (Triton only): the same launch writes the rotated
k and the v rows into the paged KV cache.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minivllm.attention.kv_cache import LayerKVCache
from minivllm.layers.norm import RMSNorm, fused_kernels_apply


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.x frequency remapping: long wavelengths slowed by ``factor``, short kept, a
    smooth blend in between (the published llama3 recipe)."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def compute_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict | None) -> torch.Tensor:
    """Per-pair inverse frequencies, after any supported scaling.

    Raises:
        ValueError: for a rope scaling type this project does not implement.
    """
    # float32 throughout, the way HF computes it, so float32 outputs match it bit for bit.
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = None
    if rope_scaling:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q/k given absolute positions; cos/sin precomputed once."""

    def __init__(self, head_dim: int, max_position: int, rope_theta: float,
                 rope_scaling: dict | None = None) -> None:
        super().__init__()
        inv_freq = compute_inv_freq(head_dim, rope_theta, rope_scaling)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float())
        # float32 cache: positions can be large, bf16 angles would lose precision.
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None, *,
                use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q: ``[T, Hq, D]``, k: ``[T, Hk, D]``; returns rotated (q, k) in their dtype.

        With ``q_norm``/``k_norm`` (both or neither), each head is RMS-normalised first, as
        ``q_norm(q)``/``k_norm(k)`` would (Qwen3); the Triton path does both in one launch.
        ``use_triton`` as in :func:`minivllm.layers.norm.fused_kernels_apply`.

        Raises:
            ValueError: when only one of ``q_norm``/``k_norm`` is given.
        """
        if (q_norm is None) != (k_norm is None):
            raise ValueError("pass both q_norm and k_norm, or neither")
        if fused_kernels_apply(q, use_triton):
            # Imported here: only the CUDA (or forced) path needs triton.
            from minivllm.kernels.rotary import rotary_embedding

            if q_norm is None:
                return rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache)
            return rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache,
                                    q_norm.weight, k_norm.weight, q_norm.eps, k_norm.eps)
        if q_norm is not None:
            q = q_norm(q, use_triton=False)
            k = k_norm(k, use_triton=False)
        cos = self.cos_cache[positions].unsqueeze(1)  # [T, 1, D/2]
        sin = self.sin_cache[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def forward_and_store_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, kv_cache: LayerKVCache,
                             slot_mapping: torch.Tensor, q_norm: RMSNorm | None = None,
                             k_norm: RMSNorm | None = None) -> torch.Tensor:
        """As ``forward`` on the Triton path, but the rotated k and ``v`` go straight into
        ``kv_cache`` at ``slot_mapping`` (slots < 0 untouched; FP8 quantised with the layer's
        scales), as the attention backend's own store would write them. Returns the rotated q.

        Always the Triton kernel (CUDA, or the interpreter on CPU): the caller decides when it
        applies (see ``DecoderAttention.attend``).

        Raises:
            ValueError: when only one of ``q_norm``/``k_norm`` is given, or on inputs the
                kernel cannot take.
        """
        if (q_norm is None) != (k_norm is None):
            raise ValueError("pass both q_norm and k_norm, or neither")
        from minivllm.kernels.rotary_kv_store import rotary_embedding_store_kv

        norm = {}
        if q_norm is not None:
            norm = {"q_norm_weight": q_norm.weight, "k_norm_weight": k_norm.weight,
                    "q_eps": q_norm.eps, "k_eps": k_norm.eps}
        return rotary_embedding_store_kv(positions, q, k, v, kv_cache.k, kv_cache.v,
                                         slot_mapping, self.cos_cache, self.sin_cache, **norm,
                                         k_scale=kv_cache.k_scale, v_scale=kv_cache.v_scale)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1 = x[..., :half].float()
    x2 = x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
