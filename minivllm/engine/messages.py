"""What crosses between the engine core and its frontend (in-process now, ZMQ later)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineCoreOutput:
    """New tokens of one sequence from one step, and whether the core finished it."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None = None
    new_sampled_logprobs: list[float] | None = None
    new_sampled_ranks: list[int] | None = None  # rank of each new token among its step's logprobs
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # Set with finish_reason "error": the step that ran this request failed in a way that
    # concerns only the requests in it; the engine goes on.
    error: str | None = None
    # A pooling request's result (class scores or embedding), with finish_reason "stop".
    pooled: list[float] | None = None
    # With the first token of a request that asked for prompt logprobs: one entry per prompt
    # position 0 .. P-2 (``{token id: logprob}``, top-N most likely first, then prompt token
    # ``p + 1`` when not among them), and that prompt token's rank at each position.
    prompt_logprobs: list[dict[int, float]] | None = None
    prompt_logprob_ranks: list[int] | None = None


@dataclass
class EngineCoreOutputs:
    """Everything one ``EngineCore.step()`` produced, plus step counters for progress bars."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
