"""EngineArgs: every engine argument of ``LLM``, ``AsyncLLM`` and the CLI, in one place.

A field's default and help text (its ``metadata``) are the single source: ``LLM(model, **kwargs)``
and ``AsyncLLM(model, **kwargs)`` accept exactly these names, and the command line flags
(``--max-num-seqs``, ``--enable-prefix-caching/--no-enable-prefix-caching``, ...) are generated
from them. ``create_engine_config()`` validates the values once and resolves them into the
frozen ``EngineConfig`` the engine runs on.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minivllm.config import (KV_CACHE_DTYPES, LOAD_FORMATS, QUANTIZATIONS, TASKS, CacheConfig,
                             EngineConfig, ModelArchConfig, SchedulerConfig,
                             default_max_num_batched_tokens, resolve_device, resolve_dtype,
                             resolve_task, validate_engine_args)
from minivllm.distributed.sharding import check_tensor_parallel
from minivllm.layers.quantization import resolve_quantization
from minivllm.models.pooling import architecture_for_task


def _arg(default: Any, help: str, **cli: Any) -> Any:
    """A field with its help text; ``cli`` holds extra argparse settings (``choices``,
    ``aliases``, ``type``, ``metavar``)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class EngineArgs:
    """The arguments of an engine, with their defaults (vLLM's names where vLLM has them)."""

    model: str | None = _arg(
        None, "local HF directory, .gguf file, or HF hub repo id such as Qwen/Qwen3-0.6B "
        "(default: the embedded SmolLM2-135M-Instruct)")
    tokenizer: str | None = _arg(
        None, "tokenizer directory or hub repo id (at main), when it is not the model's "
        "(default: the model's)")
    revision: str | None = _arg(
        None, "hub branch, tag or commit of a hub model id (default: main)")
    trust_remote_code: bool = _arg(
        False, "let the HF tokenizer run code shipped with the model")
    dtype: str | torch.dtype = _arg(
        "auto", "weight and activation dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, "
        "float16 or bfloat16", type=str)
    device: str | torch.device = _arg("auto", "auto (CUDA when available), cuda, cuda:N or cpu",
                                      type=str)
    load_format: str = _arg("auto", "how weights are read; dummy: seeded random weights",
                            choices=LOAD_FORMATS)
    max_model_len: int | None = _arg(
        None, "longest sequence (prompt + output) in tokens (default: the model's context length)")
    max_num_seqs: int = _arg(256, "most sequences in one engine step")
    max_num_batched_tokens: int | None = _arg(
        None, "tokens per engine step (default: 8192 on CUDA, 256 on CPU)")
    block_size: int = _arg(16, "tokens per KV-cache block (a multiple of 16)")
    num_kv_blocks: int | None = _arg(
        None, "KV-cache blocks to allocate (default: as many as gpu_memory_utilization allows)")
    gpu_memory_utilization: float = _arg(
        0.9, "fraction of the GPU memory the engine may use (weights, activations, KV cache)")
    enable_prefix_caching: bool = _arg(True, "reuse the KV cache of shared prompt prefixes")
    enforce_eager: bool = _arg(False, "no CUDA graphs: run every step eagerly")
    seed: int = _arg(0, "seed of the engine's random state (requests without their own seed)")
    attention_backend: str = _arg("auto", "attention implementation: auto, triton or torch")
    tensor_parallel_size: int = _arg(
        1, "split the model over this many devices (one worker process each)", aliases=("-tp",))
    skip_tokenizer_init: bool = _arg(
        False, "load no tokenizer: prompts must be token ids and outputs have no text")
    async_scheduling: bool | None = _arg(
        None, "prepare step N+1 while step N runs (default: on for CUDA)")
    kv_cache_dtype: str = _arg("auto", "KV-cache storage: auto (the model dtype) or fp8 "
                               "(float8 e4m3 with per-layer K/V scales: twice the tokens of "
                               "bf16)", choices=KV_CACHE_DTYPES)
    calculate_kv_scales: bool = _arg(
        False, "fp8 KV cache: set each layer's K/V scales from the first step's amax / 448 "
        "(else fixed at 1.0)")
    quantization: str | None = _arg(
        None, "quantise the weights at load time", choices=tuple(q for q in QUANTIZATIONS if q))
    task: str = _arg("auto", "what the model does: generate, classify or embed "
                     "(auto: from the model's architecture)", choices=TASKS)

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, model: str | None, kwargs: dict[str, Any], owner: str) -> "EngineArgs":
        """``EngineArgs(model=model, **kwargs)``; an unknown name raises ``TypeError`` naming
        it (and the closest known one) as a call to ``owner`` would."""
        names = cls.field_names()
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close and close[0] != key else ""
                raise TypeError(f"{owner}() got an unexpected keyword argument {key!r}{hint}")
        return cls(model=model, **kwargs)

    def engine_kwargs(self) -> dict[str, Any]:
        """Every field but ``model``: ``LLM(args.model, **args.engine_kwargs())``."""
        return {name: getattr(self, name) for name in self.field_names() if name != "model"}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    # ---- command line ----------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
        """Add one flag per field (``--max-num-seqs``...); booleans get ``--x/--no-x``."""
        hints = typing.get_type_hints(cls)
        group = parser.add_argument_group("engine arguments")
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            meta = dict(f.metadata)
            flags = [f"--{f.name.replace('_', '-')}", *meta.pop("aliases", ())]
            help_text = meta.pop("help")
            base = _base_type(hints[f.name])
            if f.default is not None and "default:" not in help_text:
                help_text += " (default: %(default)s)"
            if base is bool:
                group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=f.default, help=help_text)
                continue
            kwargs: dict[str, Any] = {"type": meta.pop("type", base), "default": f.default}
            kwargs.update(meta)
            group.add_argument(*flags, dest=f.name, help=help_text, **kwargs)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        """The EngineArgs of a parsed command line (fields missing from it keep their default)."""
        return cls(**{name: getattr(args, name) for name in cls.field_names() if hasattr(args, name)})

    # ---- resolution --------------------------------------------------------------------------
    def create_engine_config(self) -> EngineConfig:
        """Validate every argument once and resolve them into a frozen ``EngineConfig``.

        ``async_scheduling=None`` overlaps host scheduling with the device step on CUDA and not
        elsewhere (on CPU the "device" is the host: nothing to overlap); ``True`` forces it.
        ``max_num_batched_tokens=None`` is 8192 on CUDA and 256 on CPU, where a step of 8192
        prompt tokens would take minutes and an abort only takes effect at the next step.

        Raises:
            ValueError: naming the argument, for any value out of range or a model that
                cannot be found; nothing has been started then.
        """
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be True, False or None, got {self.async_scheduling!r}")
        for name in ("enable_prefix_caching", "enforce_eager", "skip_tokenizer_init", "trust_remote_code",
                     "calculate_kv_scales"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("tokenizer", "revision"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (str, Path)) or not str(value)):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        dev = resolve_device(self.device)
        max_num_batched_tokens = self.max_num_batched_tokens
        if max_num_batched_tokens is None:
            max_num_batched_tokens = default_max_num_batched_tokens(dev)
        validate_engine_args(block_size=self.block_size, max_num_seqs=self.max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens,
                             gpu_memory_utilization=self.gpu_memory_utilization,
                             num_kv_blocks=self.num_kv_blocks, load_format=self.load_format,
                             tensor_parallel_size=self.tensor_parallel_size,
                             max_model_len=self.max_model_len, kv_cache_dtype=self.kv_cache_dtype,
                             quantization=self.quantization, task=self.task)
        dtype = resolve_dtype(self.dtype, dev)

        from minivllm.models.embedded import resolve_model_dir, resolve_tokenizer_dir

        model_dir = resolve_model_dir(self.model, revision=self.revision,
                                      trust_remote_code=self.trust_remote_code)
        tokenizer_dir = None
        if self.tokenizer is not None:
            tokenizer_dir = resolve_tokenizer_dir(self.tokenizer,
                                                  trust_remote_code=self.trust_remote_code)
        arch = ModelArchConfig.from_dir(model_dir)
        task = resolve_task(self.task, arch, model_dir)
        # A pre-quantised checkpoint (Qwen's *-FP8, a GGUF Q8_0) runs in its own format.
        quantization = resolve_quantization(self.quantization, model_dir)
        # A pooling task runs the checkpoint's decoder under the matching pooling architecture.
        arch = dataclasses.replace(arch, architecture=architecture_for_task(arch.architecture, task))
        # resolve_model_dir already converted a GGUF file into a safetensors directory.
        load_format = "safetensors" if self.load_format in ("auto", "gguf") else self.load_format
        if load_format == "safetensors" and not any(Path(model_dir).glob("*.safetensors")):
            # Said here, before any engine process starts (a hub repo may ship only *.bin).
            raise ValueError(f"no *.safetensors weights in {model_dir}; minivllm loads safetensors "
                             "or GGUF (or load_format='dummy' for random weights)")
        check_tensor_parallel(arch, self.tensor_parallel_size)  # before any worker process starts
        max_model_len = self.max_model_len
        if max_model_len is None:
            max_model_len = arch.max_position_embeddings
        elif max_model_len > arch.max_position_embeddings:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's "
                             f"max_position_embeddings {arch.max_position_embeddings}")
        async_scheduling = self.async_scheduling
        if async_scheduling is None:
            async_scheduling = dev.type == "cuda"
        return EngineConfig(
            model_dir=Path(model_dir), arch=arch, device=dev, dtype=dtype, load_format=load_format,
            cache=CacheConfig(self.block_size, self.num_kv_blocks, self.gpu_memory_utilization,
                              self.enable_prefix_caching),
            scheduler=SchedulerConfig(self.max_num_seqs, max_num_batched_tokens, max_model_len),
            seed=self.seed, enforce_eager=self.enforce_eager,
            attention_backend=self.attention_backend,
            tensor_parallel_size=self.tensor_parallel_size,
            skip_tokenizer_init=self.skip_tokenizer_init, async_scheduling=async_scheduling,
            kv_cache_dtype=self.kv_cache_dtype, calculate_kv_scales=self.calculate_kv_scales,
            quantization=quantization, task=task, tokenizer_dir=tokenizer_dir,
            trust_remote_code=self.trust_remote_code)


def _base_type(hint: Any) -> Any:
    """``int | None`` → ``int``; ``str | torch.dtype`` → ``str`` (the first member)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        return members[0]
    return hint
