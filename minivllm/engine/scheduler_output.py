"""What one engine step asks of the model runner(s), as plain, picklable data.

The scheduler owns the live ``Request`` objects; the runner keeps a persistent batch of rows
keyed by request id and is told only what changed: rows to create (``new_requests``), rows to
drop (``finished_req_ids``), and for every scheduled row its new blocks and the token ids of
its chunk. The same object can be sent unchanged to tensor-parallel workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minivllm.pooling_params import PoolingParams
from minivllm.sampling_params import SamplingParams

# In ``SchedulerOutput.token_ids``: this input token was sampled by the previous step and is
# still on the device; the runner takes it from there.
TOKEN_FROM_DEVICE = -1


@dataclass
class NewRequestData:
    """A row the runner has not seen: first scheduled, or resumed after a preemption."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # known outputs (non-empty when resuming after a preemption)
    block_ids: list[int]
    params: SamplingParams
    seed: int | None
    eos_token_ids: tuple[int, ...]
    pooling_params: PoolingParams | None = None  # a pooling request (prefill only)


@dataclass
class SchedulerOutput:
    """One step. Per-row lists are in batch order (the order of ``req_ids``)."""

    new_requests: list[NewRequestData] = field(default_factory=list)
    # Rows to drop before this step runs: finished, aborted or preempted since the last step.
    finished_req_ids: list[str] = field(default_factory=list)
    req_ids: list[str] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)  # before this step
    # Blocks appended to a running row's table since it was last scheduled (absent: none).
    new_block_ids: dict[str, list[int]] = field(default_factory=dict)
    # Input ids of every scheduled token, rows concatenated; TOKEN_FROM_DEVICE where unknown.
    token_ids: list[int] = field(default_factory=list)
    # Batch indices of the rows whose chunk ends their sequence: they sample a token.
    sampling_rows: list[int] = field(default_factory=list)
    # Batch indices of the pooling requests whose chunk ends their prompt: they are pooled.
    pooling_rows: list[int] = field(default_factory=list)
    # Counters for progress bars and metrics (not needed by the runner).
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.req_ids


@dataclass
class PromptLogprobsChunk:
    """Prompt logprobs computed by one step for one request (its chunk of the prompt).

    Entry ``i`` is for prompt position ``start + i``, i.e. how likely the model found prompt
    token ``start + i + 1`` there: ``{token id: logprob}`` with the top-N most likely first,
    then that prompt token when it is not among them; ``ranks[i]`` is that token's 1-based
    rank over the whole vocabulary.
    """

    start: int
    logprobs: list[dict[int, float]]
    ranks: list[int]


@dataclass
class ModelRunnerOutput:
    """Tokens sampled by one step, for the rows in ``SchedulerOutput.sampling_rows`` order."""

    req_ids: list[str]
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]
    sampled_logprobs: list[float | None]
    # 1-based rank of each sampled token among its step's logprobs (None: not asked for).
    sampled_ranks: list[int | None] | None = None
    # Pooling requests finished by this step, and each one's pooled output (see pooling/).
    pooled_req_ids: list[str] = field(default_factory=list)
    pooled: list[list[float]] = field(default_factory=list)
    # Requests with ``prompt_logprobs`` whose chunk this step scored prompt positions of.
    prompt_logprobs: dict[str, PromptLogprobsChunk] = field(default_factory=dict)
