"""Test checkpoints: a peaked tiny random model, and the same weights in the layout Qwen
publishes its FP8 models in (``Qwen/Qwen3-*-FP8``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from minivllm.layers.quantization.formats import FP8_E4M3, quantize_blockwise


def write_peaked_qwen3(path: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen3 whose dims are multiples of 128 (whole FP8 blocks), with peaked
    next-token distributions: the LM head is scaled so that the top token averages p ≈ 0.5
    (HF's init alone gives near-uniform ones, where every logprob is ≈ -log(vocab))."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False,
                      eos_token_id=None, bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(path)
    return path


def write_fp8_block_checkpoint(src: Path, dst: Path, block: tuple[int, int] = (128, 128),
                               drop: str | None = None) -> Path:
    """``src``'s decoder linear weights as float8 e4m3 codes + float32 ``weight_scale_inv``
    per ``block``, with Qwen's ``quantization_config``; everything else copied as is.
    ``drop`` names one tensor to leave out (to test incomplete checkpoints)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    loaded = {}
    for shard in sorted(src.glob("*.safetensors")):  # HF may shard large models
        loaded.update(load_file(str(shard)))
    for name, t in loaded.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            q, scale = quantize_blockwise(t, FP8_E4M3, *block)
            tensors[name], tensors[name + "_scale_inv"] = q, scale
        else:
            tensors[name] = t
    if drop is not None:
        del tensors[drop]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                     "quant_method": "fp8", "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config))
    for extra in ("generation_config.json",):
        if (src / extra).is_file():
            shutil.copy(src / extra, dst / extra)
    return dst
