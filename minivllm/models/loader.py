"""Build a model on its device and fill its weights: safetensors (streamed) or dummy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from minivllm.attention.base import AttentionBackend
from minivllm.config import ModelArchConfig
from minivllm.models.registry import get_model_class


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time so that no checkpoint is held twice in RAM."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir} (use load_format='dummy' for random weights)")
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Seeded random weights with a scale that keeps activations finite through many layers."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=gen)


def load_model(arch: ModelArchConfig, model_dir: Path, backend: AttentionBackend,
               device: torch.device, dtype: torch.dtype, load_format: str, seed: int,
               max_position: int) -> nn.Module:
    """Construct the registered model class directly on ``device`` and load its weights.

    Raises:
        ValueError: unknown architecture, missing/extra checkpoint tensors, shape mismatch.
    """
    cls = get_model_class(arch.architecture)
    with _default_dtype(dtype), torch.device(device):
        model = cls(arch, backend, max_position)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        with torch.no_grad():
            loaded = model.load_weights(iter_safetensors(model_dir))
        missing = model.expected_weight_names() - loaded
        if missing:
            raise ValueError(f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    return model.eval()
