"""One sequence as the engine core sees it: tokens, progress, blocks, stop state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from minivllm.pooling_params import PoolingParams
from minivllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class Request:
    """A single sequence (a request with ``n > 1`` becomes ``n`` of these).

    ``num_computed_tokens`` counts tokens whose K/V is in the cache; the scheduler hands out
    ``num_tokens - num_computed_tokens`` more per step, whatever the phase (prefill or decode).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    eos_token_ids: frozenset[int] = frozenset()
    seed: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    block_ids: list[int] = field(default_factory=list)
    # Chained hashes of this request's full blocks, grown lazily as blocks fill.
    block_hashes: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_preemptions: int = 0
    # Tokens sampled by a step still in flight: scheduled as if known (their K/V can be
    # computed by the next step, whose input ids come straight from the device), but not yet
    # in ``output_token_ids``. Overlapped scheduling keeps at most one per request.
    num_placeholders: int = 0
    num_blocks_sent: int = 0  # leading ``block_ids`` the model runner already has
    # Set for classify/embed requests: prefill only, the pooled hidden state is the output.
    pooling_params: PoolingParams | None = None
    # With ``params.prompt_logprobs``: the prompt logprobs received so far (one entry per
    # prompt position from 0, see ``PromptLogprobsChunk``), sent with the first output token.
    prompt_logprobs: list[dict[int, float]] | None = None
    prompt_logprob_ranks: list[int] | None = None
    prompt_logprobs_sent: bool = False

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and self.pooling_params is None

    def add_prompt_logprobs(self, start: int, logprobs: list[dict[int, float]], ranks: list[int]) -> None:
        """Append a step's chunk of prompt logprobs. Positions already held or sent (a prompt
        computed again after a preemption) are dropped, so each position counts once."""
        if self.prompt_logprobs_sent:
            return
        if self.prompt_logprobs is None:
            self.prompt_logprobs, self.prompt_logprob_ranks = [], []
        skip = len(self.prompt_logprobs) - start
        if skip < 0:
            raise RuntimeError(f"prompt logprobs of request {self.request_id!r} skipped positions "
                               f"{len(self.prompt_logprobs)}..{start - 1}")
        self.prompt_logprobs.extend(logprobs[skip:])
        self.prompt_logprob_ranks.extend(ranks[skip:])

    def take_prompt_logprobs(self) -> tuple[list[dict[int, float]], list[int]] | None:
        """The whole prompt's logprobs, once (with the first output token); None otherwise."""
        if not self.wants_prompt_logprobs or self.prompt_logprobs_sent:
            return None
        self.prompt_logprobs_sent = True
        lps, ranks = self.prompt_logprobs or [], self.prompt_logprob_ranks or []
        self.prompt_logprobs = self.prompt_logprob_ranks = None
        return lps, ranks

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens the scheduler may compute up to: known ones plus in-flight placeholders."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_placeholders

    @property
    def num_known_tokens(self) -> int:
        """Prompt plus the output tokens the host has received."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_pending_output_tokens(self) -> int:
        """Output tokens received or in flight (what ``max_tokens`` limits)."""
        return len(self.output_token_ids) + self.num_placeholders

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output without building the full list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
