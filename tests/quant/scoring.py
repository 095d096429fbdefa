"""Teacher-forced scoring through the engine's own loader and model code (CPU, torch reference
attention): every mode scores the same token sequence, so log-probabilities compare directly."""

from __future__ import annotations

from pathlib import Path

import torch

from minivllm.attention.kv_cache import LayerKVCache
from minivllm.attention.metadata import AttentionMetadata
from minivllm.attention.torch_ref import TorchReferenceBackend
from minivllm.config import ModelArchConfig
from minivllm.layers.quantization import resolve_quantization
from minivllm.models.loader import load_model

BLOCK_SIZE = 16


def load(model_dir: str | Path, dtype: torch.dtype = torch.float32, quantization: str | None = None,
         load_format: str = "safetensors"):
    """``(arch, model)`` as the engine would build them for these arguments."""
    model_dir = Path(model_dir)
    arch = ModelArchConfig.from_dir(model_dir)
    quant = resolve_quantization(quantization, model_dir)
    model = load_model(arch, model_dir, TorchReferenceBackend(), torch.device("cpu"), dtype,
                       load_format, seed=0, max_position=512, quantization=quant)
    return arch, model


def next_token_logprobs(arch: ModelArchConfig, model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """float32 ``[len(ids), vocab]`` log-probabilities of the token after each prefix."""
    n = len(ids)
    num_blocks = -(-n // BLOCK_SIZE)
    dtype = model.embed_tokens.weight.dtype
    shape = (num_blocks, BLOCK_SIZE, model.num_local_kv_heads, arch.head_dim)
    kv = [LayerKVCache(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
          for _ in range(arch.num_hidden_layers)]
    qsl = torch.tensor([0, n], dtype=torch.int32)
    seq_lens = torch.tensor([n], dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, dtype=torch.int64), query_start_loc=qsl, seq_lens=seq_lens,
        block_tables=torch.arange(num_blocks, dtype=torch.int32)[None], max_query_len=n,
        max_seq_len=n, query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, num_actual_tokens=n)
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(n), kv, meta)
        return torch.log_softmax(model.compute_logits(hidden).float(), dim=-1)


def compare(ref: torch.Tensor, got: torch.Tensor, ids: list[int]) -> tuple[float, float]:
    """``(mean |Δ logprob| of the actual next tokens, greedy (argmax) agreement)``."""
    nxt = torch.tensor(ids[1:])
    rows = torch.arange(len(nxt))
    dlp = (ref[rows, nxt] - got[rows, nxt]).abs().mean().item()
    agree = (ref[:-1].argmax(-1) == got[:-1].argmax(-1)).float().mean().item()
    return dlp, agree
