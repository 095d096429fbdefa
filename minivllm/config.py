"""Frozen, validated configuration: user args → these dataclasses → components (one way)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
KV_CACHE_DTYPES = ("auto", "fp8")
QUANTIZATIONS = (None, "fp8", "int8")
TASKS = ("auto", "generate", "classify", "embed")


@dataclass(frozen=True)
class ModelArchConfig:
    """The architecture facts the model code needs, read from an HF ``config.json``."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    # Class names of a ``*ForSequenceClassification`` head, by index (empty for other models).
    id2label: tuple[str, ...] = ()

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelArchConfig":
        """Parse ``config.json`` (+ ``generation_config.json`` for EOS ids) in ``model_dir``."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"no config.json in model directory {model_dir}")
        raw = json.loads(path.read_text())
        return cls.from_dict(raw, _generation_eos(Path(model_dir)))

    @classmethod
    def from_dict(cls, raw: dict, extra_eos: list[int] | None = None) -> "ModelArchConfig":
        archs = raw.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry")
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        # transformers >= 5 saves rope settings under rope_parameters; older ones at top level.
        rope = raw.get("rope_parameters") or {}
        rope_theta = float(raw.get("rope_theta", rope.get("rope_theta", 10000.0)))
        rope_scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
        model_type = raw.get("model_type", "")
        eos = raw.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        for e in extra_eos or []:
            if e not in eos_ids:
                eos_ids.append(e)
        return cls(
            architecture=archs[0],
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias; Llama-family configs say so explicitly.
            attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            bos_token_id=raw.get("bos_token_id"),
            id2label=_labels(raw) if archs[0].endswith("ForSequenceClassification") else (),
        )


def _labels(raw: dict) -> tuple[str, ...]:
    """Label names of a classifier config, as HF reads them: ``id2label`` when saved, else
    ``num_labels`` (default 2) names ``LABEL_i``."""
    id2label = raw.get("id2label")
    if isinstance(id2label, dict) and id2label:
        by_index = {int(k): str(v) for k, v in id2label.items()}
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"config.json id2label keys must be 0..{len(by_index) - 1}")
        return tuple(by_index[i] for i in range(len(by_index)))
    n = int(raw.get("num_labels") or 2)
    return tuple(f"LABEL_{i}" for i in range(n))


def _generation_eos(model_dir: Path) -> list[int]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but CUDA is not available")
    return dev


def default_max_num_batched_tokens(device: torch.device) -> int:
    """Tokens per step by default: a GPU step of 8192 takes milliseconds; on a CPU (tens of
    ms per prompt token on 2 cores) 256 keeps a step to a few seconds, so aborts and new
    requests wait at most that long."""
    return 8192 if device.type == "cuda" else 256


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on CUDA, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose auto, float32, float16 or bfloat16")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache shape. ``num_kv_blocks`` is filled in once memory has been profiled."""

    block_size: int
    num_kv_blocks: int | None
    gpu_memory_utilization: float
    enable_prefix_caching: bool


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine step."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine core needs, validated once."""

    model_dir: Path
    arch: ModelArchConfig
    device: torch.device
    dtype: torch.dtype
    load_format: str
    cache: CacheConfig
    scheduler: SchedulerConfig
    seed: int
    enforce_eager: bool
    attention_backend: str
    tensor_parallel_size: int
    skip_tokenizer_init: bool
    # Overlapped scheduling: prepare step N+1 while step N runs (resolved: on for CUDA).
    async_scheduling: bool = False
    # "auto" stores K/V in the model dtype; "fp8" in float8 e4m3 with per-layer scales.
    kv_cache_dtype: str = "auto"
    # FP8 only: set each layer's K/V scales from the first step's amax / 448 (else 1.0).
    calculate_kv_scales: bool = False
    # Weight quantisation applied at load time (None = weights as stored).
    quantization: str | None = None
    # What the engine runs: "generate" (causal LM), "classify" or "embed" (pooling models).
    task: str = "generate"
    # A tokenizer directory other than ``model_dir`` (None: the model's own).
    tokenizer_dir: Path | None = None
    # Passed to the HF tokenizer loading: allow code shipped with the model to run.
    trust_remote_code: bool = False


def validate_engine_args(*, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                         gpu_memory_utilization: float, num_kv_blocks: int | None,
                         load_format: str, tensor_parallel_size: int,
                         max_model_len: int | None, kv_cache_dtype: str = "auto",
                         quantization: str | None = None, task: str = "auto") -> None:
    """Raise ValueError with a message for any engine argument out of range."""
    def is_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not is_int(block_size) or block_size < 1 or block_size % 16:
        raise ValueError(f"block_size must be a positive multiple of 16, got {block_size!r}")
    if not is_int(max_num_seqs) or max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs!r}")
    if not is_int(max_num_batched_tokens) or max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens!r}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    if num_kv_blocks is not None and (not is_int(num_kv_blocks) or num_kv_blocks < 1):
        raise ValueError(f"num_kv_blocks must be a positive integer or None, got {num_kv_blocks!r}")
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if not is_int(tensor_parallel_size) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
    if max_model_len is not None and (not is_int(max_model_len) or max_model_len < 1):
        raise ValueError(f"max_model_len must be a positive integer or None, got {max_model_len!r}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def resolve_task(task: str, arch: ModelArchConfig, model_dir: Path | None = None) -> str:
    """``auto`` → ``classify`` for ``*ForSequenceClassification`` architectures, ``embed`` for
    bare decoders (``Qwen3Model``, what ``AutoModel`` saves) and sentence-transformers packages
    (a ``modules.json`` beside the config, as Qwen3-Embedding ships), else ``generate``."""
    if task != "auto":
        return task
    name = arch.architecture
    if name.endswith("ForSequenceClassification"):
        return "classify"
    if name.endswith("Model") or (model_dir is not None and (Path(model_dir) / "modules.json").is_file()):
        return "embed"
    return "generate"
