"""Continuous-batching scheduler with a per-step token budget.

Every request has ``num_computed_tokens`` and ``num_tokens``; a step hands each scheduled
request some of the difference. Running requests go first (decodes cost one token each),
then waiting ones (FCFS) fill what is left of the budget, so decode and prefill chunks share a
step and long prompts are prefilled in chunks. When blocks run out, the newest running request
is preempted (its blocks freed, recomputed later from its tokens) rather than failing anything.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from minivllm.config import SchedulerConfig
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.request import Request, RequestStatus


def check_prompt_fits(num_prompt_tokens: int, max_model_len: int) -> None:
    """Raise ValueError when a prompt leaves no room for one generated token."""
    if num_prompt_tokens >= max_model_len:
        raise ValueError(
            f"prompt has {num_prompt_tokens} tokens, but max_model_len is {max_model_len} "
            "(the prompt plus at least one generated token must fit)")


@dataclass
class SchedulerOutput:
    """Which requests run this step and how many new tokens each computes (same order)."""

    requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    """Decides each step's batch; owns the waiting/running queues and the block manager."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        capacity = block_manager.num_blocks * block_manager.block_size
        if config.max_model_len > capacity:
            # One sequence could outgrow the whole cache and preempt itself forever.
            raise ValueError(f"max_model_len ({config.max_model_len}) exceeds the KV cache capacity "
                             f"({capacity} tokens)")
        self.config = config
        self.kv = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # ---- intake --------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a request. Its admissibility was checked by the engine (``check_fits``)."""
        self.waiting.append(req)

    def check_fits(self, num_prompt_tokens: int) -> None:
        """Raise ValueError when a prompt can never run: too long, or more blocks than exist."""
        check_prompt_fits(num_prompt_tokens, self.config.max_model_len)
        if self.kv.blocks_needed(num_prompt_tokens + 1) > self.kv.num_blocks:
            raise ValueError(
                f"prompt needs {self.kv.blocks_needed(num_prompt_tokens + 1)} KV blocks but the cache "
                f"only has {self.kv.num_blocks}")

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        preempted_this_step = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            while not self.kv.allocate(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted_this_step = True
                if victim is req:
                    break
            else:
                out.requests.append(req)
                out.num_scheduled_tokens.append(num_new)
                budget -= num_new
                i += 1
                continue
            # ``req`` itself was preempted: it was last in ``running``, so the loop ends.

        # New work only when nothing had to be evicted: admitting it would just thrash.
        while (self.waiting and budget > 0 and not preempted_this_step
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            cached = self.kv.find_cached_prefix(req)
            num_cached_tokens = len(cached) * self.kv.block_size
            num_new = min(req.num_tokens - num_cached_tokens, budget)
            if not self.kv.allocate(req, num_new, cached):
                break
            self.waiting.popleft()
            if req.status == RequestStatus.WAITING:
                # Hit statistics count a prompt once, not again after a preemption.
                self.kv.record_lookup(req.num_prompt_tokens, num_cached_tokens)
                req.num_cached_tokens = num_cached_tokens
            req.num_computed_tokens = num_cached_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.requests.append(req)
            out.num_scheduled_tokens.append(num_new)
            budget -= num_new
        return out

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- after the step ------------------------------------------------------------------
    def update_after_step(self, out: SchedulerOutput) -> list[Request]:
        """Advance progress and register newly full blocks. Returns the requests whose last
        scheduled token completed their sequence (they sampled a token this step)."""
        sampled = []
        for req, n in zip(out.requests, out.num_scheduled_tokens):
            req.num_computed_tokens += n
            self.kv.cache_computed_blocks(req)
            if req.num_computed_tokens == req.num_tokens:
                sampled.append(req)
        return sampled

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark ``req`` finished (from any queue) and free its blocks."""
        if req.is_finished:
            return
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
