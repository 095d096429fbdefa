"""Continuous-batching scheduler with a per-step token budget.

Every request has ``num_computed_tokens`` and ``num_tokens``; a step hands each scheduled
request some of the difference. Running requests go first (decodes cost one token each),
then waiting ones (FCFS) fill what is left of the budget, so decode and prefill chunks share a
step and long prompts are prefilled in chunks. When blocks run out, the newest running request
is preempted (its blocks freed, recomputed later from its tokens) rather than failing anything.

Progress is counted when a step is scheduled, not when it returns: a request whose chunk ends
its sequence gets a *placeholder* for the token that step will sample. So the next step can be
scheduled while this one still runs (overlapped scheduling); the placeholder's input id is read
on the device. ``update_from_output`` later swaps placeholders for the real tokens.
"""

from __future__ import annotations

from collections import deque

from minivllm.config import SchedulerConfig
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.request import Request, RequestStatus
from minivllm.engine.scheduler_output import (TOKEN_FROM_DEVICE, ModelRunnerOutput, NewRequestData,
                                              SchedulerOutput)


def check_prompt_fits(num_prompt_tokens: int, max_model_len: int, pooling: bool = False) -> None:
    """Raise ValueError when a prompt leaves no room for one generated token (for a pooling
    request, which generates none: when it is longer than ``max_model_len``)."""
    if pooling:
        if num_prompt_tokens > max_model_len:
            raise ValueError(f"prompt has {num_prompt_tokens} tokens, but max_model_len is {max_model_len} "
                             "(truncate_prompt_tokens truncates it)")
        return
    if num_prompt_tokens >= max_model_len:
        raise ValueError(
            f"prompt has {num_prompt_tokens} tokens, but max_model_len is {max_model_len} "
            "(the prompt plus at least one generated token must fit)")


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
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.num_preemptions = 0
        # Rows the runner must drop at the next step (finished, aborted, preempted).
        self.finished_req_ids: list[str] = []

    # ---- intake --------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a request. Its admissibility was checked by the engine (``check_fits``)."""
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def check_fits(self, num_prompt_tokens: int, pooling: bool = False) -> None:
        """Raise ValueError when a prompt can never run: too long, or more blocks than exist."""
        check_prompt_fits(num_prompt_tokens, self.config.max_model_len, pooling)
        num_tokens = num_prompt_tokens + (0 if pooling else 1)
        if self.kv.blocks_needed(num_tokens) > self.kv.num_blocks:
            raise ValueError(
                f"prompt needs {self.kv.blocks_needed(num_tokens)} KV blocks but the cache "
                f"only has {self.kv.num_blocks}")

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        scheduled: list[tuple[Request, int, bool]] = []  # (request, tokens, is new row)
        budget = self.config.max_num_batched_tokens
        preempted_this_step = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0 or self._must_wait(req):
                i += 1
                continue
            while not self.kv.allocate(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted_this_step = True
                if victim is req:
                    break
            else:
                scheduled.append((req, num_new, False))
                budget -= num_new
                i += 1
                continue
            # ``req`` itself was preempted: it was last in ``running``, so the loop ends.

        # New work only when nothing had to be evicted: admitting it would just thrash.
        while (self.waiting and budget > 0 and not preempted_this_step
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            if req.num_placeholders:
                break  # preempted with a token in flight: resume once it has arrived
            # Mean pooling needs every token's hidden state, prompt logprobs every prompt
            # token's logits: a cached prefix would skip some (as in vLLM, no lookup then).
            pooling = req.pooling_params
            cached = ([] if (pooling is not None and pooling.pooling_type == "mean")
                      or req.wants_prompt_logprobs else self.kv.find_cached_prefix(req))
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
            scheduled.append((req, num_new, True))
            budget -= num_new
        return self._describe(scheduled)

    def _must_wait(self, req: Request) -> bool:
        """A request whose in-flight token may be its last is not run again until it is known:
        it is never given a token beyond ``max_tokens`` or ``max_model_len``."""
        if not req.num_placeholders:
            return False
        max_tokens = req.params.max_tokens
        return ((max_tokens is not None and req.num_pending_output_tokens >= max_tokens)
                or req.num_tokens >= self.config.max_model_len)

    def _describe(self, scheduled: list[tuple[Request, int, bool]]) -> SchedulerOutput:
        """The step as plain data for the runner; counts the scheduled tokens as computed."""
        out = SchedulerOutput(finished_req_ids=self.finished_req_ids)
        self.finished_req_ids = []
        token_ids = out.token_ids
        for row, (req, n, is_new) in enumerate(scheduled):
            start = req.num_computed_tokens
            if is_new:
                out.new_requests.append(NewRequestData(
                    req.request_id, req.prompt_token_ids, list(req.output_token_ids),
                    list(req.block_ids), req.params, req.seed, tuple(sorted(req.eos_token_ids)),
                    req.pooling_params))
            elif len(req.block_ids) > req.num_blocks_sent:
                out.new_block_ids[req.request_id] = req.block_ids[req.num_blocks_sent:]
            req.num_blocks_sent = len(req.block_ids)
            out.req_ids.append(req.request_id)
            out.num_scheduled_tokens.append(n)
            out.num_computed_tokens.append(start)
            known_end = min(start + n, req.num_known_tokens)
            if known_end == start + 1 == req.num_known_tokens and req.output_token_ids:
                token_ids.append(req.output_token_ids[-1])  # the common decode case
            else:
                token_ids.extend(req.token_slice(start, known_end))
            if start + n > known_end:
                token_ids.append(TOKEN_FROM_DEVICE)  # at most one: see Request.num_placeholders
            if n == 1 and start >= req.num_prompt_tokens:
                out.num_decode_tokens += 1
            else:
                out.num_prefill_tokens += n
            req.num_computed_tokens = start + n
            if req.num_computed_tokens == req.num_tokens:
                if req.pooling_params is not None:
                    out.pooling_rows.append(row)  # no token: the step's output finishes it
                else:
                    out.sampling_rows.append(row)
                    req.num_placeholders += 1
        return out
    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        self.finished_req_ids.append(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_blocks_sent = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- after the step ------------------------------------------------------------------
    def update_from_output(self, step: SchedulerOutput,
                           output: ModelRunnerOutput) -> list[tuple[Request, int]]:
        """Swap the step's placeholders for the sampled tokens and register newly full blocks.

        Returns ``(request, index into output)`` for each live request that got a token;
        tokens of requests that finished meanwhile (a stop seen one step late, an abort) are
        dropped here and never reach the user.
        """
        updated = []
        for i, rid in enumerate(output.req_ids):
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            req.num_placeholders -= 1
            req.output_token_ids.append(output.token_ids[i])
            updated.append((req, i))
        for rid in step.req_ids:
            req = self.requests.get(rid)
            if req is not None and not req.is_finished and req.block_ids:
                self.kv.cache_computed_blocks(req)
        return updated

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark ``req`` finished (from any queue) and free its blocks."""
        if req.is_finished:
            return
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        self.requests.pop(req.request_id, None)
        if req in self.running:
            self.running.remove(req)
            self.finished_req_ids.append(req.request_id)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
