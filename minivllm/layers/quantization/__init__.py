"""Weight quantisation for the linear layers: which method a model's checkpoint and the user's
``quantization`` argument call for.

- ``None``: weights as stored — dense, or, when ``config.json`` carries a
  ``quantization_config`` we read (Qwen's block FP8, our GGUF ``Q8_0`` conversion), that format.
- ``"fp8"``: float8 e4m3 weights (:mod:`.fp8`); dense checkpoints are quantised at load.
- ``"int8"``: int8 weight-only (:mod:`.int8`); dense checkpoints are quantised at load.

Only the decoder's linear layers are quantised; embeddings, the LM head and norms stay in the
compute dtype (the LM head feeds float32 logits and, tied, is the embedding itself).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from minivllm.layers.quantization.base import LinearMethod, UnquantizedLinearMethod

# The quant_method our GGUF converter writes for Q8_0 weights kept as int8 (see gguf_convert).
GGUF_INT8_METHOD = "minivllm_int8"


@dataclass(frozen=True)
class CheckpointQuant:
    """What a pre-quantised checkpoint holds: the method and its scale block (rows, cols)."""

    method: str
    block: tuple[int, int]


def checkpoint_quantization(model_dir: Path) -> CheckpointQuant | None:
    """The quantisation ``config.json`` declares, ``None`` for a dense checkpoint.

    Raises:
        ValueError: a quantisation format minivllm cannot load.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    qcfg = json.loads(path.read_text()).get("quantization_config")
    if not qcfg:
        return None
    method = qcfg.get("quant_method")
    block = qcfg.get("weight_block_size")
    if method == "fp8":
        if not block:
            raise ValueError(f"{model_dir}: per-tensor FP8 checkpoints are not supported, only "
                             f"block-wise ones (weight_block_size, e.g. Qwen's *-FP8)")
        if qcfg.get("activation_scheme", "dynamic") != "dynamic":
            raise ValueError(f"{model_dir}: FP8 with static activation scales is not supported")
        return CheckpointQuant("fp8", (int(block[0]), int(block[1])))
    if method == GGUF_INT8_METHOD:
        return CheckpointQuant("int8", (int(block[0]), int(block[1])))
    raise ValueError(f"{model_dir}: quantization_config quant_method {method!r} is not supported "
                     f"(supported: block-wise 'fp8', GGUF Q8_0)")


def resolve_quantization(requested: str | None, model_dir: Path) -> str | None:
    """The method the engine runs: the checkpoint's own if it is pre-quantised, else ``requested``.

    Raises:
        ValueError: ``requested`` differs from a pre-quantised checkpoint's format.
    """
    ckpt = checkpoint_quantization(model_dir)
    if ckpt is None or requested == ckpt.method:
        return requested
    if requested is None:
        return ckpt.method
    raise ValueError(f"the checkpoint in {model_dir} is pre-quantised as {ckpt.method}; "
                     f"quantization={requested!r} cannot be applied to it (omit it, or pass "
                     f"{ckpt.method!r})")


def make_linear_method(quantization: str | None, model_dir: Path | None,
                       device: torch.device) -> LinearMethod:
    """The method object every linear layer of the model shares."""
    if quantization is None:
        return UnquantizedLinearMethod()
    ckpt = checkpoint_quantization(model_dir) if model_dir is not None else None
    block = ckpt.block if ckpt is not None and ckpt.method == quantization else None
    if quantization == "fp8":
        from minivllm.layers.quantization.fp8 import Fp8LinearMethod

        return Fp8LinearMethod(device, block)
    if quantization == "int8":
        from minivllm.layers.quantization.int8 import Int8LinearMethod

        return Int8LinearMethod(device, block)
    raise ValueError(f"unknown quantization {quantization!r}")


__all__ = ["CheckpointQuant", "LinearMethod", "UnquantizedLinearMethod", "checkpoint_quantization",
           "make_linear_method", "resolve_quantization"]
