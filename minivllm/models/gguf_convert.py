"""Convert a ``.gguf`` checkpoint, once, into an HF-style model directory.

The engine only knows how to load HF-style directories (``config.json`` + ``*.safetensors`` +
tokenizer files + ``generation_config.json``). Dequantising a GGUF and building its tokenizer takes
several seconds, so we do it once and cache the result; later loads just read the directory.

Layout of the cache: ``<cache_root>/gguf/<stem>-<key>/`` where ``key`` hashes the file's resolved
path, size and mtime plus this converter's version, so an edited or replaced file reconverts and a
converter fix invalidates old output. A conversion is written to a temporary sibling directory and
renamed into place as the very last step, so an interrupted run never leaves a directory that a
later load would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Bump whenever the output of a conversion changes, so stale cache entries are not reused.
# 2: Q8_0 linear weights kept as int8 codes + block scales.
CONVERTER_VERSION = 2

CACHE_DIR_ENV = "MINIVLLM_CACHE_DIR"

# The files whose presence marks a finished conversion (the tokenizer adds more, e.g. the template).
REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json")

# Temp dirs older than this are leftovers of a killed conversion, not a concurrent one in progress.
_STALE_TMP_AGE_S = 3600.0

# Token texts that llama.cpp treats as end-of-generation when they are control tokens. GGUF
# metadata usually names only one EOS id, but chat models stop on several (e.g. Qwen's
# <|im_end|> and <|endoftext|>), and the engine must know all of them.
_EOG_TOKEN_TEXTS = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "<end_of_utterance>",
})
_TOKEN_TYPE_CONTROL = 3


@dataclass(frozen=True)
class _ArchSpec:
    """How one GGUF ``general.architecture`` maps onto an HF model class."""

    hf_architecture: str
    model_type: str
    # llama.cpp reorders Llama's Q/K rows from HF's rotate-half layout into interleaved pairs;
    # its Qwen2/Qwen3 converters do not (transformers' GGUF loader only un-permutes "llama").
    permute_qk: bool


_ARCHS: dict[str, _ArchSpec] = {
    "llama": _ArchSpec("LlamaForCausalLM", "llama", permute_qk=True),
    "qwen2": _ArchSpec("Qwen2ForCausalLM", "qwen2", permute_qk=False),
    "qwen3": _ArchSpec("Qwen3ForCausalLM", "qwen3", permute_qk=False),
}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

_REQUIRED_LAYER_TENSORS = (
    "attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
    "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
)

_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

# The decoder's linear weights: the tensors a Q8_0 file may keep as int8 (embeddings and the
# LM head are never quantised by the engine, so they are expanded like any other type).
_LINEAR_LEAVES = frozenset({
    "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
    "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
})
_Q8_0_BLOCK = 32  # weights per Q8_0 block: one float16 scale, then 32 int8 codes
# What config.json says about Q8_0 weights kept as int8 (read by minivllm.layers.quantization).
_Q8_0_QUANT_CONFIG = {"quant_method": "minivllm_int8", "weight_block_size": [1, _Q8_0_BLOCK],
                      "source": "GGUF Q8_0"}


def default_cache_root() -> Path:
    """``$MINIVLLM_CACHE_DIR`` if set, else ``~/.cache/minivllm``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minivllm"


def converted_dir_for(gguf_path: str | Path, cache_root: Path | None = None) -> Path:
    """Where ``gguf_path`` is (or would be) converted to; does not convert.

    Raises:
        ValueError: if ``gguf_path`` is not an existing file.
    """
    path = _check_gguf_path(gguf_path)
    stat = path.stat()
    ident = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0v{CONVERTER_VERSION}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    return root / "gguf" / f"{path.stem}-{key}"


def is_converted(model_dir: Path) -> bool:
    """True if ``model_dir`` holds a finished conversion."""
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


def convert_gguf_to_hf_dir(gguf_path: str | Path, cache_root: Path | None = None) -> Path:
    """Return an HF-style model directory for ``gguf_path``, converting it on first use.

    The directory holds ``config.json``, ``model.safetensors`` (float32, HF tensor names, Llama
    Q/K un-permuted), tokenizer files (with the chat template) and ``generation_config.json``
    (every EOS id found). A cache hit only stats the file, so it costs milliseconds.

    When every decoder linear weight is ``Q8_0``, those stay int8 (``<name>`` as I8 codes plus
    ``<name>_scale``, float32 per 1x32 block: the file's own numbers) and ``config.json`` gets a
    ``quantization_config`` that makes the engine run them as ``quantization="int8"``.

    Args:
        gguf_path: path to a ``.gguf`` file (architectures ``llama``, ``qwen2``, ``qwen3``).
        cache_root: cache directory; defaults to :func:`default_cache_root`.

    Raises:
        ValueError: the path is not a file, is not a readable GGUF, or holds an unsupported
            architecture, tensor layout or tokenizer.
    """
    path = _check_gguf_path(gguf_path)
    final_dir = converted_dir_for(path, cache_root)
    if is_converted(final_dir):
        return final_dir
    if final_dir.exists():
        # Not written by us (we only ever rename complete dirs): someone removed files by hand.
        logger.warning("incomplete conversion at %s; converting again", final_dir)
        shutil.rmtree(final_dir, ignore_errors=True)

    final_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(final_dir)
    start_s = time.perf_counter()
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))
    try:
        tmp_dir.chmod(0o755)  # mkdtemp's 0700 would survive the rename and hide a shared cache
        _convert_into(path, tmp_dir)
        _fsync_files(tmp_dir)
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            # A concurrent conversion of the same file won the race; its output is as good as ours.
            if not is_converted(final_dir):
                raise
            shutil.rmtree(tmp_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("converted %s -> %s in %.1fs", path, final_dir, time.perf_counter() - start_s)
    return final_dir


def _check_gguf_path(gguf_path: str | Path) -> Path:
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise ValueError(f"GGUF file not found: {str(gguf_path)!r}")
    return path.resolve()


def _remove_stale_tmp_dirs(final_dir: Path) -> None:
    now_s = time.time()
    for tmp in final_dir.parent.glob(f".tmp-{final_dir.name}-*"):
        try:
            # The newest file, not the dir: a live conversion keeps appending to model.safetensors.
            last_write_s = max([tmp.stat().st_mtime] + [f.stat().st_mtime for f in tmp.iterdir()])
        except OSError:
            continue  # another process finished or cleaned it up meanwhile
        if now_s - last_write_s > _STALE_TMP_AGE_S:
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_files(directory: Path) -> None:
    # Without this, a power cut just after the rename could leave a trusted dir of empty files.
    for file in directory.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _convert_into(path: Path, out_dir: Path) -> None:
    """Write every output file for ``path`` into ``out_dir`` (which the caller makes atomic)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises assorted errors on non-GGUF input
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc
    meta = _Metadata(reader)
    arch_name = meta.get("general.architecture")
    spec = _ARCHS.get(arch_name)
    if spec is None:
        raise ValueError(
            f"{path}: GGUF architecture {arch_name!r} is not supported (supported: {sorted(_ARCHS)})"
        )
    tensors = {t.name: t for t in reader.tensors}
    config = _build_config(meta, arch_name, spec, tensors)
    if _linear_weights_all_q8_0(tensors):
        config["quantization_config"] = dict(_Q8_0_QUANT_CONFIG)
    _write_weights(out_dir / "model.safetensors", tensors, config, spec)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", _build_generation_config(meta, config))
    _write_tokenizer(path, out_dir, meta, config["max_position_embeddings"])


class _Metadata:
    """Typed access to the GGUF key/value header."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"GGUF metadata is missing required key {key!r}")
        return value


def _build_config(meta: _Metadata, arch: str, spec: _ArchSpec, tensors: dict[str, Any]) -> dict:
    """The HF ``config.json`` dict for this file."""
    num_heads = int(meta.require(f"{arch}.attention.head_count"))
    num_kv_heads = _uniform_int(meta.get(f"{arch}.attention.head_count_kv", num_heads), "head_count_kv")
    hidden_size = int(meta.require(f"{arch}.embedding_length"))
    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF has no token_embd.weight tensor")
    # The embedding's row count is the truth the weights were trained with; metadata may omit it.
    vocab_size = int(tensors["token_embd.weight"].shape[-1])
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
    config: dict[str, Any] = {
        "architectures": [spec.hf_architecture],
        "model_type": spec.model_type,
        "hidden_size": hidden_size,
        "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": int(head_dim) if head_dim else hidden_size // num_heads,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        # 10000 is llama.cpp's own default when the key is absent.
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": vocab_size,
        "max_position_embeddings": int(meta.require(f"{arch}.context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
    }
    if spec.model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = False
    elif spec.model_type == "qwen3":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            config[hf_key] = int(value)
    rope_scaling = _rope_scaling(meta, arch, tensors, config)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _uniform_int(value: Any, what: str) -> int:
    if isinstance(value, list):
        # Per-layer lists appear in hybrid models; a dense decoder has one value repeated.
        if len(set(value)) != 1:
            raise ValueError(f"per-layer {what} {value} is not supported")
        value = value[0]
    return int(value)


def _rope_scaling(meta: _Metadata, arch: str, tensors: dict[str, Any], config: dict) -> dict | None:
    """HF ``rope_scaling`` from the GGUF header, or from Llama-3's ``rope_freqs`` tensor."""
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if scaling_type in ("linear", "yarn") and factor:
        scaling: dict[str, Any] = {"rope_type": scaling_type, "factor": float(factor)}
        if scaling_type == "yarn":
            orig = meta.get(f"{arch}.rope.scaling.original_context_length")
            if orig:
                scaling["original_max_position_embeddings"] = int(orig)
            for hf_key, gguf_key in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
                value = meta.get(f"{arch}.rope.scaling.{gguf_key}")
                if value is not None:
                    scaling[hf_key] = float(value)
        return scaling
    if scaling_type not in (None, "none"):
        raise ValueError(f"rope scaling type {scaling_type!r} is not supported")
    if "rope_freqs.weight" in tensors:
        freq_factors = _dequantize(tensors["rope_freqs.weight"]).reshape(-1).astype(np.float64)
        return _llama3_scaling_from_factors(freq_factors, config["rope_theta"], config["head_dim"])
    return None


def _llama3_scaling_from_factors(freq_factors: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """Recover HF's ``llama3`` rope parameters from llama.cpp's per-frequency divisors.

    In the smooth band, ``1/r = (1 - s)/factor + s`` with ``s = old_ctx/wavelen/(hi - lo) - lo/(hi - lo)``,
    which is linear in ``1/wavelen``. Only ``old_ctx/(hi - lo)`` and ``lo/(hi - lo)`` are identifiable,
    and scaling all three by one constant gives identical frequencies, so fixing ``lo = 1`` is exact.
    """
    if np.allclose(freq_factors, 1.0):
        return None
    factor = float(freq_factors.max())
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if inv_freq.shape != freq_factors.shape:
        raise ValueError(f"rope_freqs has {freq_factors.size} entries, expected {inv_freq.size}")
    wavelen = 2 * np.pi / inv_freq
    band = (freq_factors > 1.0 + 1e-4) & (freq_factors < factor - 1e-4 * factor)
    smooth = (1.0 / freq_factors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
    if band.sum() < 2:
        raise ValueError("cannot infer llama3 rope scaling from rope_freqs: fewer than 2 smooth bands")
    slope, intercept = np.polyfit(1.0 / wavelen[band], smooth, 1)
    if slope <= 0 or intercept >= 0:
        raise ValueError("rope_freqs does not follow the llama3 rope scaling formula")
    high_freq_factor = 1.0 - 1.0 / intercept
    scaling = {
        "rope_type": "llama3",
        "factor": _snap(factor),
        "low_freq_factor": 1.0,
        "high_freq_factor": _snap(high_freq_factor),
        "original_max_position_embeddings": _snap(slope * (high_freq_factor - 1.0)),
    }
    old_ctx = scaling["original_max_position_embeddings"]
    if old_ctx == int(old_ctx):
        scaling["original_max_position_embeddings"] = int(old_ctx)
    if not np.allclose(_llama3_freq_factors(scaling, theta, head_dim), freq_factors, rtol=1e-4):
        raise ValueError("rope_freqs does not follow the llama3 rope scaling formula")
    return scaling


def _snap(value: float) -> float:
    # Real checkpoints use round numbers (8192, 4.0); the fit from float32 factors is off in the
    # last digits. The caller re-checks that the snapped values reproduce the stored factors.
    return float(round(value)) if abs(value - round(value)) < 1e-4 * max(1.0, abs(value)) else float(value)


def _llama3_freq_factors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors that llama.cpp stores in ``rope_freqs`` for HF ``llama3`` scaling."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    factor, old_ctx = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (old_ctx / wavelen - low) / (high - low)
    band = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, band))


def _hf_tensor_name(gguf_name: str, num_layers: int) -> str | None:
    """HF name for a GGUF tensor; None for tensors that only feed the config (``rope_freqs``)."""
    if gguf_name == "rope_freqs.weight":
        return None
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS and int(match.group(1)) < num_layers:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r} (not a dense Llama/Qwen decoder?)")


def _check_complete(tensors: dict[str, Any], num_layers: int) -> None:
    missing = [name for name in ("token_embd.weight", "output_norm.weight") if name not in tensors]
    missing += [f"blk.{i}.{leaf}" for i in range(num_layers) for leaf in _REQUIRED_LAYER_TENSORS
                if f"blk.{i}.{leaf}" not in tensors]
    if missing:
        raise ValueError(f"GGUF is missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _dequantize(tensor: Any) -> np.ndarray:
    """The tensor as float32 in HF's (row-major, reversed-from-GGUF) shape."""
    from gguf.quants import dequantize

    hf_shape = tuple(int(dim) for dim in reversed(tensor.shape))
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ValueError(f"tensor {tensor.name}: quantization {tensor.tensor_type.name} unsupported") from exc
    return np.asarray(values, dtype=np.float32).reshape(hf_shape)


def _unpermute_rotary(values: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row order: per head it stores (half, pair) where HF has (pair, half).

    Works for weights (rows x in) and biases (rows,) alike, since only the row axis moves.
    """
    rows = values.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot un-permute {rows} rows into {num_heads} heads")
    split = values.reshape(num_heads, rows // num_heads // 2, 2, *values.shape[1:])
    return split.swapaxes(1, 2).reshape(values.shape)


def _linear_weights_all_q8_0(tensors: dict[str, Any]) -> bool:
    """True when every decoder linear weight is Q8_0: then they stay int8 (1x32 block scales,
    exactly the file's numbers, a quarter of float32's bytes) and the engine runs them as
    ``quantization="int8"``. A file mixing Q8_0 with other types is expanded as a whole: one
    model, one linear format."""
    import gguf

    linear = [t for name, t in tensors.items()
              if (m := _LAYER_RE.match(name)) and m.group(2) in _LINEAR_LEAVES]
    return bool(linear) and all(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in linear)


def _q8_0_codes_and_scales(tensor: Any) -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0 tensor's int8 codes ``[N, K]`` and float32 block scales ``[N, K / 32]``."""
    rows, cols = (int(dim) for dim in reversed(tensor.shape))
    block_bytes = 2 + _Q8_0_BLOCK
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, cols // _Q8_0_BLOCK, block_bytes)
    scales = raw[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    codes = raw[:, :, 2:].copy().view(np.int8).reshape(rows, cols)
    return codes, scales


def _write_weights(out_path: Path, tensors: dict[str, Any], config: dict, spec: _ArchSpec) -> None:
    num_layers = config["num_hidden_layers"]
    _check_complete(tensors, num_layers)
    keep_q8_0 = "quantization_config" in config

    def permuted(gguf_name: str, values: np.ndarray) -> np.ndarray:
        if spec.permute_qk and ".attn_q." in gguf_name:
            return _unpermute_rotary(values, config["num_attention_heads"])
        if spec.permute_qk and ".attn_k." in gguf_name:
            return _unpermute_rotary(values, config["num_key_value_heads"])
        return values

    plan: list[_PlannedTensor] = []
    for gguf_name, tensor in tensors.items():
        hf_name = _hf_tensor_name(gguf_name, num_layers)
        if hf_name is None:
            continue
        shape = [int(dim) for dim in reversed(tensor.shape)]
        match = _LAYER_RE.match(gguf_name)
        if keep_q8_0 and match and match.group(2) in _LINEAR_LEAVES:
            # Codes and scales are read twice (once each); a Q8_0 tensor is small next to F32.
            plan.append(_PlannedTensor(hf_name, shape, "I8", lambda t=tensor, n=gguf_name:
                                       permuted(n, _q8_0_codes_and_scales(t)[0])))
            plan.append(_PlannedTensor(hf_name + "_scale", [shape[0], shape[1] // _Q8_0_BLOCK], "F32",
                                       lambda t=tensor, n=gguf_name:
                                       permuted(n, _q8_0_codes_and_scales(t)[1])))
        else:
            plan.append(_PlannedTensor(hf_name, shape, "F32", lambda t=tensor, n=gguf_name:
                                       permuted(n, _dequantize(t))))
    _stream_safetensors(out_path, plan)


@dataclass(frozen=True)
class _PlannedTensor:
    """One output tensor: its name, shape and safetensors dtype, and how to produce it."""

    name: str
    shape: list[int]
    dtype: str  # "F32" or "I8"
    produce: Callable[[], np.ndarray]


_NUMPY_DTYPES = {"F32": "<f4", "I8": "i1"}


def _stream_safetensors(out_path: Path, plan: list[_PlannedTensor]) -> None:
    """Write tensors one at a time, so peak memory is one tensor, not the whole model.

    safetensors' own ``save_file`` needs every tensor in memory at once; the format (u64 header
    length, JSON header with offsets, raw little-endian data) is simple enough to stream.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in plan:
        nbytes = np.dtype(_NUMPY_DTYPES[item.dtype]).itemsize * int(np.prod(item.shape))
        header[item.name] = {"dtype": item.dtype, "shape": item.shape,
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep tensor data 8-byte aligned
    with open(out_path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for item in plan:
            values = np.ascontiguousarray(item.produce(), dtype=_NUMPY_DTYPES[item.dtype])
            if list(values.shape) != item.shape:
                raise ValueError(f"{item.name}: produced shape {values.shape}, expected {item.shape}")
            f.write(memoryview(values).cast("B"))


def _build_generation_config(meta: _Metadata, config: dict) -> dict:
    """``generation_config.json``: the header's EOS first, then every other end-of-generation id."""
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in eos_ids:
            eos_ids.append(int(value))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    token_types = meta.get("tokenizer.ggml.token_type") or []
    for token_id, (text, token_type) in enumerate(zip(tokens, token_types, strict=False)):
        if token_type == _TOKEN_TYPE_CONTROL and text in _EOG_TOKEN_TEXTS and token_id not in eos_ids:
            eos_ids.append(token_id)
    generation: dict[str, Any] = {}
    if eos_ids:
        generation["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    for key in ("bos_token_id", "pad_token_id"):
        if key in config:
            generation[key] = config[key]
    return generation


def _write_tokenizer(path: Path, out_dir: Path, meta: _Metadata, max_length_tokens: int) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises many types for unsupported tokenizers
        raise ValueError(f"{path}: could not build a tokenizer from the GGUF: {exc}") from exc
    template = meta.get("tokenizer.chat_template")
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    # Without this the saved config claims an effectively infinite context window.
    tokenizer.model_max_length = max_length_tokens
    tokenizer.save_pretrained(str(out_dir))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
