"""Offline inference facade: ``LLM(...).generate(prompts, params)`` and ``.chat(messages)``."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from minivllm.config import (CacheConfig, EngineConfig, ModelArchConfig, SchedulerConfig,
                             default_max_num_batched_tokens, resolve_device, resolve_dtype,
                             resolve_task, validate_engine_args)
from minivllm.distributed.sharding import check_tensor_parallel
from minivllm.engine.core import EngineCore
from minivllm.engine.frontend import build_frontend
from minivllm.engine.input_processor import ProcessedPrompt, PromptType
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams
from minivllm.tokenizer import render_chat

logger = logging.getLogger(__name__)


def build_engine_config(model: str | None = None, *, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "auto", max_model_len: int | None = None,
                        max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                        block_size: int = 16, num_kv_blocks: int | None = None,
                        gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = True,
                        enforce_eager: bool = False, seed: int = 0, load_format: str = "auto",
                        attention_backend: str = "auto", tensor_parallel_size: int = 1,
                        skip_tokenizer_init: bool = False,
                        async_scheduling: bool | None = None, kv_cache_dtype: str = "auto",
                        quantization: str | None = None, task: str = "auto",
                        calculate_kv_scales: bool = False) -> EngineConfig:
    """Validate user arguments once and resolve them into a frozen ``EngineConfig``.

    The keyword arguments (and their defaults) are those of ``LLM`` and ``AsyncLLM``.
    ``async_scheduling=None`` overlaps host scheduling with the device step on CUDA and not
    elsewhere (on CPU the "device" is the host: nothing to overlap); ``True`` forces it.
    ``max_num_batched_tokens=None`` is 8192 on CUDA and 256 on CPU, where a step of 8192 prompt
    tokens would take minutes and an abort only takes effect at the next step.
    ``kv_cache_dtype="fp8"`` stores K/V as float8 e4m3 with per-layer scales, fixed at 1.0, or
    set from the first step's ``amax / 448`` with ``calculate_kv_scales=True``.
    """
    if not isinstance(calculate_kv_scales, bool):
        raise ValueError(f"calculate_kv_scales must be True or False, got {calculate_kv_scales!r}")
    if async_scheduling is not None and not isinstance(async_scheduling, bool):
        raise ValueError(f"async_scheduling must be True, False or None, got {async_scheduling!r}")
    dev = resolve_device(device)
    if max_num_batched_tokens is None:
        max_num_batched_tokens = default_max_num_batched_tokens(dev)
    validate_engine_args(block_size=block_size, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens,
                         gpu_memory_utilization=gpu_memory_utilization, num_kv_blocks=num_kv_blocks,
                         load_format=load_format, tensor_parallel_size=tensor_parallel_size,
                         max_model_len=max_model_len, kv_cache_dtype=kv_cache_dtype,
                         quantization=quantization, task=task)
    # Seams for issues 11/12; each consumer removes its line when it lands.
    if quantization is not None:
        raise ValueError(f"quantization={quantization!r} is not implemented yet")
    if task not in ("auto", "generate"):
        raise ValueError(f"task={task!r} is not implemented yet")
    from minivllm.models.embedded import resolve_model_dir

    model_dir = resolve_model_dir(model)
    arch = ModelArchConfig.from_dir(model_dir)
    check_tensor_parallel(arch, tensor_parallel_size)  # before any worker process starts
    if max_model_len is None:
        max_model_len = arch.max_position_embeddings
    elif max_model_len > arch.max_position_embeddings:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's "
                         f"max_position_embeddings {arch.max_position_embeddings}")
    if async_scheduling is None:
        async_scheduling = dev.type == "cuda"
    if load_format == "auto":
        load_format = "safetensors"
    elif load_format == "gguf":
        load_format = "safetensors"  # resolve_model_dir already converted the GGUF file
    return EngineConfig(
        model_dir=Path(model_dir), arch=arch, device=dev, dtype=resolve_dtype(dtype, dev),
        load_format=load_format,
        cache=CacheConfig(block_size, num_kv_blocks, gpu_memory_utilization, enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len),
        seed=seed, enforce_eager=enforce_eager, attention_backend=attention_backend,
        tensor_parallel_size=tensor_parallel_size, skip_tokenizer_init=skip_tokenizer_init,
        async_scheduling=async_scheduling, kv_cache_dtype=kv_cache_dtype,
        calculate_kv_scales=calculate_kv_scales,
        quantization=quantization, task=resolve_task(task, arch))


class LLM:
    """An engine for offline batch inference.

    ``model=None`` runs the embedded SmolLM2-135M-Instruct. ``model`` may also be an HF
    directory, a ``.gguf`` file, or a directory with a ``config.json`` and
    ``load_format="dummy"`` for seeded random weights.
    """

    def __init__(self, model: str | None = None, *, dtype: str | torch.dtype = "auto",
                 device: str | torch.device = "auto", max_model_len: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 block_size: int = 16,
                 num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False, seed: int = 0,
                 load_format: str = "auto", attention_backend: str = "auto",
                 tensor_parallel_size: int = 1, skip_tokenizer_init: bool = False,
                 async_scheduling: bool | None = None, kv_cache_dtype: str = "auto",
                 quantization: str | None = None, task: str = "auto",
                 calculate_kv_scales: bool = False) -> None:
        self.config = build_engine_config(
            model, dtype=dtype, device=device, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size, num_kv_blocks=num_kv_blocks,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager, seed=seed,
            load_format=load_format, attention_backend=attention_backend,
            tensor_parallel_size=tensor_parallel_size, skip_tokenizer_init=skip_tokenizer_init,
            async_scheduling=async_scheduling, kv_cache_dtype=kv_cache_dtype,
            quantization=quantization, task=task, calculate_kv_scales=calculate_kv_scales)
        frontend = build_frontend(self.config)
        self.tokenizer = frontend.tokenizer
        self.eos_token_ids = frontend.eos_token_ids
        self.input_processor = frontend.input_processor
        self.output_processor = frontend.output_processor
        self.engine = EngineCore(self.config)
        self._ids = itertools.count()

    # ---- public API ----------------------------------------------------------------------
    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate completions for one prompt or a list; outputs are in input order.

        A request that fails inside the engine (a model step that raised for the requests in
        it) comes back finished with ``finish_reason="error"`` and ``RequestOutput.error``; the
        others are unaffected.

        Raises:
            ValueError: a bad prompt or parameter list; nothing is run and the engine stays usable.
        """
        prompt_list = _as_prompt_list(prompts)
        processed = [self.input_processor.process_prompt(p) for p in prompt_list]
        return self._run(processed, self._params_list(sampling_params, len(processed)), use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one OpenAI-style conversation or a list of them."""
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        conversations = messages if isinstance(messages[0], list) else [messages]
        processed = []
        for conv in conversations:
            text = render_chat(self.tokenizer, conv)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            processed.append(ProcessedPrompt(text, ids))
        return self._run(processed, self._params_list(sampling_params, len(processed)), use_tqdm)

    def stats(self) -> dict:
        """Engine counters: preemptions, prefix-cache queries/hits (tokens), KV cache size/usage."""
        return self.engine.stats()

    def get_tokenizer(self):
        return self.tokenizer

    # ---- internals -----------------------------------------------------------------------
    @staticmethod
    def _params_list(params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        if isinstance(params, (list, tuple)):
            if len(params) != n:
                raise ValueError(f"got {len(params)} sampling params for {n} prompts; "
                                 "pass one SamplingParams or a list of the same length")
            for p in params:
                if not isinstance(p, SamplingParams):
                    raise ValueError(f"sampling_params entries must be SamplingParams, got {type(p).__name__}")
            return list(params)
        raise ValueError(f"sampling_params must be SamplingParams or a list of them, got {type(params).__name__}")

    def _run(self, prompts: list[ProcessedPrompt], params: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        # Validate everything before queueing anything, so a bad prompt leaves no residue.
        for p in prompts:
            self.engine.check_request(len(p.prompt_token_ids))
        order: dict[str, int] = {}
        now = time.time()
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            rid = str(next(self._ids))
            order[rid] = i
            self.output_processor.add_request(rid, prompt, sp, now)
            for req in self.input_processor.make_requests(rid, prompt, sp, now):
                self.engine.add_request(req)
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = _ProgressBar(len(prompts), use_tqdm)
        try:
            while self.engine.has_unfinished:
                step = self.engine.step()
                for o in step.outputs:
                    if o.error is not None:  # that request ends with finish_reason "error"
                        logger.warning("request %s failed: %s", o.request_id, o.error)
                finished, to_abort = self.output_processor.process(step.outputs)
                self.engine.abort_requests(to_abort, reason="stop")
                bar.update(len(finished), step.num_prefill_tokens, step.num_decode_tokens)
                for out in finished:
                    results[order[out.request_id]] = out
        except BaseException:
            # Leave the engine clean for the next call, whatever went wrong.
            for rid in order:
                self.output_processor.abort(rid)
            self.engine.abort_requests(list(self.engine.requests))
            raise
        finally:
            bar.close()
        return [r for r in results if r is not None]


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("no prompts given (an empty list)")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)
    raise ValueError(f"prompts must be a str, token ids, a dict or a list of them, got {type(prompts).__name__}")


class _ProgressBar:
    """tqdm bar of finished requests with prefill/decode throughput in the postfix."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
        self.start = time.perf_counter()
        self.prefill = 0
        self.decode = 0

    def update(self, done: int, prefill_tokens: int, decode_tokens: int) -> None:
        if self.bar is None:
            return
        self.prefill += prefill_tokens
        self.decode += decode_tokens
        dt = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"prefill {self.prefill / dt:.0f} tok/s, decode {self.decode / dt:.0f} tok/s",
                                 refresh=False)
        self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
