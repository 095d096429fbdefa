"""Build a model on its device and fill its weights: safetensors (streamed) or dummy.

Under tensor parallelism each rank builds its own shard (``tp_group``) and reads only its rows
of each checkpoint tensor; dummy weights are drawn for the full TP=1 tensor and then sliced,
so a TP=N model holds exactly the numbers of the TP=1 model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from minivllm.attention.base import AttentionBackend
from minivllm.config import ModelArchConfig
from minivllm.distributed.group import TensorParallelGroup
from minivllm.layers import gemv_dispatch
from minivllm.layers.quantization import make_linear_method
from minivllm.layers.weight_loading import WeightSource
from minivllm.models.registry import get_model_class

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def iter_safetensors(model_dir: Path, lazy: bool = False) -> Iterator[tuple[str, WeightSource]]:
    """Yield ``(name, tensor)`` one at a time so that no checkpoint is held twice in RAM.

    With ``lazy`` the values are safetensors slices: the consumer reads only the rows it
    indexes (a tensor-parallel rank its shard). The file stays open while they are consumed.
    """
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir} (use load_format='dummy' for random weights)")
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, (f.get_slice(name) if lazy else f.get_tensor(name))


def init_dummy_weights(model: nn.Module, seed: int, dtype: torch.dtype | None = None) -> None:
    """Seeded random weights with a scale that keeps activations finite through many layers.

    Each parameter's full TP=1 tensor is drawn in parameter order and the shard copied out of
    it, so the numbers do not depend on the tensor-parallel size. Quantised linear weights are
    drawn dense in ``dtype`` (the compute dtype) and quantised as they load, scales included.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            param.data.fill_(1.0)
            continue
        owner_name, _, param_name = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        method = getattr(owner, "method", None)
        if method is not None and method.quantized and param_name != "bias":
            if param_name == "weight":
                full = torch.empty(owner.full_shape("weight"), dtype=dtype or torch.float32,
                                   device=device)
                full.normal_(0.0, 0.02, generator=gen)
                owner.load_weight("weight", full)
            continue  # scales: set by loading the weight
        # Unsharded (TP=1 or a replicated parameter): draw in place, no full-size temporary.
        if not hasattr(owner, "load_weight") or owner.full_shape(param_name) == tuple(param.shape):
            param.data.normal_(0.0, 0.02, generator=gen)
            continue
        full = torch.empty(owner.full_shape(param_name), dtype=param.dtype, device=device)
        full.normal_(0.0, 0.02, generator=gen)
        owner.load_weight(param_name, full)


def load_model(arch: ModelArchConfig, model_dir: Path, backend: AttentionBackend,
               device: torch.device, dtype: torch.dtype, load_format: str, seed: int,
               max_position: int, tp_group: TensorParallelGroup | None = None,
               quantization: str | None = None) -> nn.Module:
    """Construct the registered model class directly on ``device`` and load its weights.

    ``tp_group`` (None: a single device) makes this rank's shard: each rank calls
    ``load_model`` with its own group view and the same other arguments. ``quantization``
    (already resolved against the checkpoint, see ``resolve_quantization``) picks how the
    decoder's linear weights are stored and multiplied.

    Raises:
        ValueError: unknown architecture, a model that does not split over the ranks,
            missing/extra checkpoint tensors, shape mismatch.
    """
    cls = get_model_class(arch.architecture)
    linear_method = make_linear_method(quantization, model_dir, device)
    if linear_method.quantized:
        logger.info("linear layers: %s (embeddings and LM head stay %s)",
                    linear_method.describe(), dtype)
    with _default_dtype(dtype), torch.device(device):
        model = cls(arch, backend, max_position, tp_group=tp_group, linear_method=linear_method)
    with torch.no_grad():
        if load_format == "dummy":
            init_dummy_weights(model, seed, dtype)
        else:
            loaded = model.load_weights(iter_safetensors(model_dir, lazy=True))
            derived = {n for n in model.expected_weight_names()
                       if n.split("#")[0].rpartition(".")[2] in linear_method.derived_params}
            missing = model.expected_weight_names() - derived - loaded
            if missing:
                raise ValueError(f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    # Build (or load) the CUDA GEMV now where it is enabled, not in the first forward / capture.
    gemv_dispatch.prepare(torch.device(device))
    return model.eval()
