"""EngineCore: the schedule → run → update loop over a scheduler and a model runner."""

from __future__ import annotations

import logging

from minivllm.config import CacheConfig, EngineConfig, SchedulerConfig
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.messages import EngineCoreOutput, EngineCoreOutputs
from minivllm.engine.request import Request
from minivllm.engine.scheduler import Scheduler
from minivllm.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class EngineCore:
    """Owns the model runner and the scheduler; knows nothing about text or tokenizers."""

    def __init__(self, config: EngineConfig) -> None:
        self.runner = ModelRunner(
            model_dir=config.model_dir, arch=config.arch, device=config.device, dtype=config.dtype,
            load_format=config.load_format, seed=config.seed,
            attention_backend=config.attention_backend,
            max_position=config.scheduler.max_model_len)
        cache = config.cache
        num_blocks = cache.num_kv_blocks or self.runner.auto_num_blocks(
            cache.block_size, cache.gpu_memory_utilization, config.scheduler.max_num_batched_tokens)
        self.runner.allocate_kv_cache(num_blocks, cache.block_size)
        # Final, frozen configs now that the cache size is known.
        self.cache_config = CacheConfig(cache.block_size, num_blocks, cache.gpu_memory_utilization,
                                        cache.enable_prefix_caching)
        sched = config.scheduler
        # A sequence longer than the whole cache could never run, even alone.
        max_model_len = min(sched.max_model_len, num_blocks * cache.block_size)
        if max_model_len < sched.max_model_len:
            logger.warning("max_model_len capped at %d tokens: the KV cache holds no more",
                           max_model_len)
        self.scheduler_config = SchedulerConfig(sched.max_num_seqs, sched.max_num_batched_tokens,
                                                max_model_len)
        self.runner.warm_up_prefill(sched.max_num_batched_tokens, max_model_len)
        if not config.enforce_eager:
            self.runner.capture_decode_graphs(sched.max_num_seqs, max_model_len)
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        self.requests: dict[str, Request] = {}
        logger.info("KV cache: %d blocks of %d tokens", num_blocks, cache.block_size)

    # ---- requests ------------------------------------------------------------------------
    def check_request(self, num_prompt_tokens: int) -> None:
        """Raise ValueError if a prompt of this length can never be served."""
        self.scheduler.check_fits(num_prompt_tokens)

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        self.check_request(req.num_prompt_tokens)
        self.requests[req.request_id] = req
        self.scheduler.add_request(req)

    def abort_requests(self, request_ids: list[str], reason: str = "abort") -> None:
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is not None:
                self.scheduler.finish(req, reason)
                self.runner.remove_request(rid)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- the loop body -------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        """One iteration: schedule → run → update. Returns new tokens and finished requests."""
        sched = self.scheduler.schedule()
        result = EngineCoreOutputs()
        if sched.is_empty:
            return result
        for req, n in zip(sched.requests, sched.num_scheduled_tokens):
            if req.num_computed_tokens + n == req.num_tokens and req.num_output_tokens > 0:
                result.num_decode_tokens += n
            else:
                result.num_prefill_tokens += n
        step = self.runner.execute(sched)
        self.scheduler.update_after_step(sched)
        for req, token, lps, slp in zip(step.requests, step.token_ids, step.logprobs,
                                        step.sampled_logprobs):
            req.output_token_ids.append(token)
            finish, stop_reason = self._check_stop(req, token)
            result.outputs.append(EngineCoreOutput(
                request_id=req.request_id, new_token_ids=[token],
                new_logprobs=[lps] if lps is not None else None,
                new_sampled_logprobs=[slp] if slp is not None else None,
                finish_reason=finish, stop_reason=stop_reason,
                num_cached_tokens=req.num_cached_tokens))
            if finish is not None:
                self.scheduler.finish(req, finish, stop_reason)
                self.requests.pop(req.request_id, None)
                self.runner.remove_request(req.request_id)
        return result

    def _check_stop(self, req: Request, token: int) -> tuple[str | None, int | None]:
        p = req.params
        if req.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in req.eos_token_ids:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
        if p.max_tokens is not None and req.num_output_tokens >= p.max_tokens:
            return "length", None
        if req.num_tokens >= self.scheduler_config.max_model_len:
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
            "kv_cache_usage": kv.usage,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
        }
