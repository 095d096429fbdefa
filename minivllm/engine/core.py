"""EngineCore: the schedule → run → update loop over a scheduler and an executor.

With overlapped ("async") scheduling the loop keeps one step in flight: it schedules and
launches step N+1, and only then waits for step N's sampled tokens and applies them. The
device never waits for the host's bookkeeping, and the host learns each token one step late;
the scheduler's placeholders (see ``scheduler.py``) make that invisible to users.
"""

from __future__ import annotations

import logging
import time

import torch

from minivllm.config import CacheConfig, EngineConfig, SchedulerConfig
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.messages import EngineCoreOutput, EngineCoreOutputs
from minivllm.engine.request import Request
from minivllm.engine.scheduler import Scheduler
from minivllm.engine.scheduler_output import SchedulerOutput
from minivllm.executor.base import Executor, StepFuture
from minivllm.executor.uniproc import UniProcExecutor
from minivllm.pooling.engine import check_task, finish_pooled

logger = logging.getLogger(__name__)


class EngineCore:
    """Owns the executor and the scheduler; knows nothing about text or tokenizers."""

    def __init__(self, config: EngineConfig) -> None:
        start = time.perf_counter()
        self.executor: Executor = _make_executor(config)
        cache, sched = config.cache, config.scheduler
        num_blocks = cache.num_kv_blocks or self.executor.num_available_kv_blocks(
            cache.block_size, cache.gpu_memory_utilization, sched.max_num_batched_tokens)
        # Final, frozen configs now that the cache size is known.
        self.cache_config = CacheConfig(cache.block_size, num_blocks, cache.gpu_memory_utilization,
                                        cache.enable_prefix_caching)
        # A sequence longer than the whole cache could never run, even alone.
        max_model_len = min(sched.max_model_len, num_blocks * cache.block_size)
        if max_model_len < sched.max_model_len:
            logger.warning("max_model_len capped at %d tokens: the KV cache holds no more",
                           max_model_len)
        self.scheduler_config = SchedulerConfig(sched.max_num_seqs, sched.max_num_batched_tokens,
                                                max_model_len)
        # Pooling models never decode: no decode graphs to capture.
        self.executor.initialize(num_blocks, cache.block_size, sched.max_num_seqs,
                                 sched.max_num_batched_tokens, max_model_len,
                                 config.enforce_eager or config.task != "generate")
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        self.async_scheduling = config.async_scheduling
        self.kv_cache_dtype = config.kv_cache_dtype
        self.task = config.task
        self._in_flight: tuple[SchedulerOutput, StepFuture] | None = None
        self.startup_s = time.perf_counter() - start
        kv_dtype = config.dtype if config.kv_cache_dtype == "auto" else "fp8 e4m3"
        logger.info("engine ready in %.1f s (load, KV cache, warm-up, graphs): %d KV blocks of %d "
                    "tokens (%s, %d tokens); overlapped scheduling %s", self.startup_s, num_blocks,
                    cache.block_size, str(kv_dtype).replace("torch.", ""),
                    num_blocks * cache.block_size, "on" if self.async_scheduling else "off")

    # ---- requests ------------------------------------------------------------------------
    @property
    def requests(self) -> dict[str, Request]:
        """Unfinished requests by id."""
        return self.scheduler.requests

    def check_request(self, num_prompt_tokens: int, pooling: bool = False) -> None:
        """Raise ValueError if a prompt of this length can never be served."""
        self.scheduler.check_fits(num_prompt_tokens, pooling)

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        check_task(self.task, req.pooling_params is not None)
        self.check_request(req.num_prompt_tokens, req.pooling_params is not None)
        self.scheduler.add_request(req)

    def abort_requests(self, request_ids: list[str], reason: str = "abort") -> None:
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None:
                self.scheduler.finish(req, reason)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or self._in_flight is not None

    # ---- the loop body -------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        """One iteration: schedule → launch → update with the tokens of the step that finished
        (this one, or with overlap the previous one). Returns new tokens and finished requests."""
        result = EngineCoreOutputs()
        sched = self.scheduler.schedule()
        result.num_prefill_tokens, result.num_decode_tokens = sched.num_prefill_tokens, sched.num_decode_tokens
        future = self._launch(sched, result)
        launched = (sched, future) if future is not None and not sched.is_empty else None
        if self.async_scheduling:
            done, self._in_flight = self._in_flight, launched
        else:
            done = launched
        if done is not None:
            self._update(done[0], done[1], result)
        return result

    def _launch(self, sched: SchedulerOutput, result: EngineCoreOutputs) -> StepFuture | None:
        """Hand the step to the executor. A failure that concerns only this step's requests
        (bad values that slipped through validation, say) fails them and the engine goes on;
        a device error means broken engine state and propagates."""
        try:
            return self.executor.execute(sched)
        except Exception as e:  # noqa: BLE001 - sorted into request errors and fatal ones below
            if _is_fatal(e):
                raise
            logger.exception("engine step failed; failing its %d requests", len(sched.req_ids))
            message = f"the model step failed for this request ({type(e).__name__}: {e})"
            for rid in sched.req_ids:
                req = self.requests.get(rid)
                if req is not None:
                    self.scheduler.finish(req, "error")
                    result.outputs.append(EngineCoreOutput(
                        request_id=rid, new_token_ids=[], finish_reason="error", error=message,
                        num_cached_tokens=req.num_cached_tokens))
            return None

    def _update(self, sched: SchedulerOutput, future: StepFuture, result: EngineCoreOutputs) -> None:
        output = future.result()
        for rid, chunk in output.prompt_logprobs.items():
            req = self.requests.get(rid)
            if req is not None:
                req.add_prompt_logprobs(chunk.start, chunk.logprobs, chunk.ranks)
        for req, i in self.scheduler.update_from_output(sched, output):
            token = output.token_ids[i]
            finish, stop_reason = self._check_stop(req, token)
            lps, slp = output.logprobs[i], output.sampled_logprobs[i]
            rank = output.sampled_ranks[i] if output.sampled_ranks is not None else None
            prompt_lps, prompt_ranks = req.take_prompt_logprobs() or (None, None)
            result.outputs.append(EngineCoreOutput(
                request_id=req.request_id, new_token_ids=[token],
                new_logprobs=[lps] if lps is not None else None,
                new_sampled_logprobs=[slp] if slp is not None else None,
                new_sampled_ranks=[rank] if rank is not None else None,
                finish_reason=finish, stop_reason=stop_reason,
                num_cached_tokens=req.num_cached_tokens,
                prompt_logprobs=prompt_lps, prompt_logprob_ranks=prompt_ranks))
            if finish is not None:
                self.scheduler.finish(req, finish, stop_reason)
        finish_pooled(self.scheduler, output, result)

    def _check_stop(self, req: Request, token: int) -> tuple[str | None, int | None]:
        p = req.params
        if req.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in req.eos_token_ids:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
        if p.max_tokens is not None and req.num_output_tokens >= p.max_tokens:
            return "length", None
        if req.num_known_tokens >= self.scheduler_config.max_model_len:
            return "length", None
        return None, None

    def stats(self) -> dict:
        kv = self.block_manager
        return {
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": kv.prefix_cache_queries,
            "prefix_cache_hits": kv.prefix_cache_hits,
            "num_kv_blocks": kv.num_blocks,
            "block_size": kv.block_size,
            "kv_cache_dtype": self.kv_cache_dtype,
            "kv_cache_usage": kv.usage,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
        }

    def shutdown(self) -> None:
        self.executor.shutdown()


def _make_executor(config: EngineConfig) -> Executor:
    """One in-process runner, or N tensor-parallel ranks (rank 0 here, the rest spawned)."""
    if config.tensor_parallel_size == 1:
        return UniProcExecutor(config)
    from minivllm.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(config)


def _is_fatal(e: BaseException) -> bool:
    """Device errors leave the CUDA context unusable, and a failed tensor-parallel worker leaves
    the ranks out of step: nothing after either can be trusted."""
    from minivllm.distributed.worker_group import WorkerError

    if isinstance(e, WorkerError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(e, accelerator_error):
        return True
    return "CUDA error" in str(e) or "CUBLAS_STATUS" in str(e)
