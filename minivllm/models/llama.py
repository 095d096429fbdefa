"""Llama-family decoder (SmolLM2, Llama 2/3) written with the project's own layers.

Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) differ only in flags, see their files.
q/k/v and gate/up projections are fused into one matmul each: fewer kernel launches per layer.

Tensor parallelism (``tp_group``): attention heads and MLP columns split over ranks, one
all-reduce after ``o_proj`` and one after ``down_proj``; vocabulary rows split for the embedding
and LM head. ``tp_group=None`` is the single-device model, computing exactly what it always did.

Where the Triton kernels run, q/k norm, rotary and the KV-cache store are one launch per layer
(``RotaryEmbedding.forward_and_store_kv``); the environment variable
``MINIVLLM_FUSE_ROPE_STORE=0``, read when a model is built, turns that off (rotary, then the
backend's own store: two launches) for A/B measurements. The results are the same bytes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch
from torch import nn

from minivllm.attention.base import AttentionBackend
from minivllm.attention.kv_cache import LayerKVCache
from minivllm.attention.metadata import AttentionMetadata
from minivllm.config import ModelArchConfig
from minivllm.distributed.group import TensorParallelGroup
from minivllm.distributed.sharding import check_tensor_parallel
from minivllm.layers.attention import PagedAttention
from minivllm.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                    RowParallelLinear)
from minivllm.layers.norm import RMSNorm, fused_kernels_apply
from minivllm.layers.quantization.base import LinearMethod
from minivllm.layers.rotary import RotaryEmbedding
from minivllm.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding, lm_logits
from minivllm.layers.weight_loading import WeightSource, copy_replicated

KVCache = LayerKVCache

logger = logging.getLogger(__name__)

FUSE_ROPE_STORE_ENV = "MINIVLLM_FUSE_ROPE_STORE"


def fuse_rope_kv_store_from_env() -> bool:
    """``MINIVLLM_FUSE_ROPE_STORE``: ``1`` (default) fuses the KV store into the rotary kernel
    where it applies, ``0`` keeps them apart (a benchmark knob; outputs are identical).

    Raises:
        ValueError: for any other value.
    """
    value = os.environ.get(FUSE_ROPE_STORE_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{FUSE_ROPE_STORE_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


class DecoderAttention(nn.Module):
    """GQA self-attention: fused qkv projection, optional q/k norm, rotary, paged attention.

    Under tensor parallelism this rank's heads only: ``num_heads``/``num_kv_heads`` are local.

    ``fuse_rope_kv_store``: let the rotary kernel also write K/V into the cache where that
    applies (see ``uses_fused_kv_store``); False always leaves the store to the backend.
    """

    def __init__(self, cfg: ModelArchConfig, backend: AttentionBackend, rotary: RotaryEmbedding,
                 qkv_bias: bool, qk_norm: bool, tp_group: TensorParallelGroup | None = None,
                 linear_method: LinearMethod | None = None,
                 fuse_rope_kv_store: bool = True) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, qkv_bias, tp_group, linear_method)
        self.num_heads = self.qkv_proj.num_local_heads
        self.num_kv_heads = self.qkv_proj.num_local_kv_heads
        self.q_size = self.qkv_proj.q_size
        self.kv_size = self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size,
                                        bias=False, tp_group=tp_group, method=linear_method)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, backend)
        self.fuse_rope_kv_store = fuse_rope_kv_store and backend.supports_fused_kv_store

    def uses_fused_kv_store(self, q: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether this step's K/V are stored by the rotary kernel: where the Triton layer
        kernels run, the backend allows it, and the step does not first compute FP8 KV scales
        from K/V (that one step keeps the store in the backend, after the scales are set)."""
        return (self.fuse_rope_kv_store and not meta.calculate_kv_scales
                and fused_kernels_apply(q))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.attend(positions, self.qkv_proj(x), kv_cache, meta)

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, kv_cache: KVCache,
               meta: AttentionMetadata) -> torch.Tensor:
        """Everything after the qkv projection: norms, rotary, paged attention, ``o_proj``."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        # Qwen3's per-head q/k norm runs inside the rotary kernel on GPU (None elsewhere).
        if self.uses_fused_kv_store(q, meta):
            # One launch: norms, rotary, and K/V written into the cache (k=v=None below).
            q = self.rotary.forward_and_store_kv(positions, q, k, v, kv_cache,
                                                 meta.slot_mapping, self.q_norm, self.k_norm)
            k = v = None
        else:
            q, k = self.rotary(positions, q, k, self.q_norm, self.k_norm)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused (column-parallel), down row-parallel."""

    def __init__(self, hidden_size: int, intermediate_size: int,
                 tp_group: TensorParallelGroup | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear.even(
            hidden_size, [intermediate_size] * 2, bias=False, tp_group=tp_group,
            method=linear_method)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False,
                                           tp_group=tp_group, method=linear_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The activation runs inside down_proj: fused into its matmul at batch-1 decode.
        return self.down_proj(self.gate_up_proj(x), input_act="silu_and_mul")


class DecoderLayer(nn.Module):
    """Pre-norm transformer block; the residual add is fused into the next norm."""

    def __init__(self, cfg: ModelArchConfig, backend: AttentionBackend, rotary: RotaryEmbedding,
                 qkv_bias: bool, qk_norm: bool, tp_group: TensorParallelGroup | None = None,
                 linear_method: LinearMethod | None = None,
                 fuse_rope_kv_store: bool = True) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DecoderAttention(cfg, backend, rotary, qkv_bias, qk_norm, tp_group,
                                          linear_method, fuse_rope_kv_store)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, tp_group, linear_method)

    def forward(self, positions, x, residual, kv_cache, meta):
        # Each pre-norm (with the residual add before it) runs folded into the projection
        # after it; see MergedColumnParallelLinear.forward_with_norm.
        attn, mlp = self.self_attn, self.mlp
        qkv, residual = attn.qkv_proj.forward_with_norm(x, residual, self.input_layernorm)
        x = attn.attend(positions, qkv, kv_cache, meta)
        gate_up, residual = mlp.gate_up_proj.forward_with_norm(x, residual,
                                                                self.post_attention_layernorm)
        return mlp.down_proj(gate_up, input_act="silu_and_mul"), residual


# HF checkpoint name fragment → (our fused parameter, shard index).
_STACKED = {
    ".q_proj.": (".qkv_proj.", 0), ".k_proj.": (".qkv_proj.", 1), ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1),
}


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM. ``forward`` returns hidden states; ``compute_logits`` the vocab scores.

    With a ``tp_group`` of N ranks this is one rank's shard; every rank runs ``forward`` and
    ``compute_logits`` on the same inputs (they contain collectives) and gets the same result.
    """

    qkv_bias_default = False
    qk_norm = False
    has_lm_head = True  # pooling variants (models/pooling.py) drop it

    def __init__(self, cfg: ModelArchConfig, backend: AttentionBackend, max_position: int,
                 tp_group: TensorParallelGroup | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        """Raises ValueError when ``cfg`` does not split over ``tp_group``'s ranks.

        ``linear_method`` stores and multiplies the decoder's linear weights (None: dense); the
        embedding and LM head are never quantised. ``MINIVLLM_FUSE_ROPE_STORE`` is read here
        (see the module docstring)."""
        super().__init__()
        if tp_group is not None:
            check_tensor_parallel(cfg, tp_group.world_size)
        self.cfg = cfg
        self.tp_group = tp_group
        qkv_bias = cfg.attention_bias or self.qkv_bias_default
        rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        fuse_rope_kv_store = fuse_rope_kv_store_from_env()
        if not fuse_rope_kv_store:
            logger.info("%s=0: rotary and the KV-cache store run as separate kernels",
                        FUSE_ROPE_STORE_ENV)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_group)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, backend, rotary, qkv_bias, self.qk_norm, tp_group, linear_method,
                         fuse_rope_kv_store)
            for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings or not self.has_lm_head else ParallelLMHead(
            cfg.vocab_size, cfg.hidden_size, tp_group)
        # Shared by all layers; registered once here so .to() moves it.
        self.rotary = rotary

    @property
    def num_local_kv_heads(self) -> int:
        """KV heads this rank's cache holds per layer (all of them at TP=1)."""
        return self.layers[0].self_attn.num_kv_heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        """input_ids/positions: ``[T]`` → final hidden states ``[T, hidden]``."""
        x = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits in float32 (sampling and logprobs want full precision)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return lm_logits(hidden, weight, self.cfg.vocab_size, self.tp_group)

    def load_weights(self, weights: Iterable[tuple[str, WeightSource]]) -> set[str]:
        """Copy HF-named tensors into our (partly fused, possibly sharded) parameters.

        ``weights`` yields full checkpoint tensors or lazy safetensors slices; sharded layers
        read only this rank's rows. Returns the names loaded (``name#part`` for fused parts).

        Raises:
            ValueError: on an unknown tensor name or a shape mismatch.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, src in weights:
            name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints still store a copy
            # FP8 checkpoints name the block scales (multipliers) weight_scale_inv.
            if name.endswith(".weight_scale_inv"):
                name = name[:-len("_inv")]
            shard = None
            for frag, (fused, idx) in _STACKED.items():
                if frag in name:
                    name, shard = name.replace(frag, fused), idx
                    break
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no matching parameter")
            owner_name, _, param_name = name.rpartition(".")
            owner = self.get_submodule(owner_name)
            try:
                if hasattr(owner, "load_weight"):
                    owner.load_weight(param_name, src, shard)
                else:
                    copy_replicated(params[name], src, name)
            except ValueError as e:
                raise ValueError(f"{hf_name}: {e}") from None
            loaded.add(name if shard is None else f"{name}#{shard}")
        return loaded

    def expected_weight_names(self) -> set[str]:
        names = set()
        for name, _ in self.named_parameters():
            if ".qkv_proj." in name:
                names.update(f"{name}#{i}" for i in range(3))
            elif ".gate_up_proj." in name:
                names.update(f"{name}#{i}" for i in range(2))
            else:
                names.add(name)
        return names
