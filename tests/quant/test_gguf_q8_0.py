"""GGUF Q8_0 linear weights stay int8 through conversion and loading, and compute what the
expanded (float32) file computes."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minivllm.models.gguf_convert import convert_gguf_to_hf_dir
from tests.quant.scoring import compare, load, next_token_logprobs
from tests.unit.test_gguf_convert import _tiny_model, _write_gguf

_LINEAR = (".attn_q.", ".attn_k.", ".attn_v.", ".attn_output.", ".ffn_gate.", ".ffn_up.", ".ffn_down.")


def _write(path, arch, model, monkeypatch, q8_0_for) -> None:
    """``_write_gguf`` with the tensors that ``q8_0_for(name)`` picks stored as Q8_0."""
    add_tensor = gguf.GGUFWriter.add_tensor

    def add(self, name, tensor, *args, **kwargs):
        if q8_0_for(name):
            q = gguf.quants.quantize(tensor, gguf.GGMLQuantizationType.Q8_0)
            return add_tensor(self, name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return add_tensor(self, name, tensor, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "add_tensor", add)
        _write_gguf(path, arch, model)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # llama: Q/K rows are un-permuted too
def test_q8_0_weights_kept_as_int8_compute_the_expanded_model(arch, tmp_path, monkeypatch):
    model = _tiny_model(arch, tie_word_embeddings=False)
    path = tmp_path / "q8.gguf"
    _write(path, arch, model, monkeypatch, lambda name: any(f in name for f in _LINEAR))
    model_dir = convert_gguf_to_hf_dir(path, tmp_path / "cache")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [1, 32]
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        codes = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        scales = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
        assert codes.dtype == torch.int8 and scales.shape == (codes.shape[0], codes.shape[1] // 32)
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32

    # Codes x scales are the original weights to within about half a Q8_0 step, in HF's row
    # order (a wrong un-permutation of Llama's Q/K rows would be off by whole weights). 0.6:
    # the step is stored as float16, whose rounding (2^-11) times codes up to 127 adds ~0.06.
    original = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    step = scales.repeat_interleave(32, 1)
    assert ((codes.float() * step - original).abs() <= step * 0.6).all()

    # The expanded model: the same numbers in float32, as the converter wrote them before.
    dense_dir = tmp_path / "dense"
    dense_dir.mkdir()
    tensors = {}
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if not name.endswith("_scale"):
                t = f.get_tensor(name)
                if t.dtype == torch.int8:
                    t = t.float() * f.get_tensor(name + "_scale").repeat_interleave(32, 1)
                tensors[name] = t
    save_file(tensors, str(dense_dir / "model.safetensors"))
    del config["quantization_config"]
    (dense_dir / "config.json").write_text(json.dumps(config))

    ids = list(range(3, 40))
    arch_cfg, dense = load(dense_dir)
    ref = next_token_logprobs(arch_cfg, dense, ids)
    arch_cfg, q8 = load(model_dir)  # quantization=None: the checkpoint's own format, int8
    assert q8.layers[0].mlp.down_proj.weight.dtype == torch.int8
    got = next_token_logprobs(arch_cfg, q8, ids)
    # Same numbers (fp16 scale x int8 code, formed in float32) by another route: only the
    # order of float32 sums differs.
    dlp, agree = compare(ref, got, ids)
    assert dlp < 1e-4 and agree == 1.0
    with pytest.raises(ValueError, match="pre-quantised as int8"):
        load(model_dir, quantization="fp8")
