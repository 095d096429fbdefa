"""What generate() returns: vLLM-shaped RequestOutput / CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (``time.time()`` seconds) of a request's life."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request.

    ``logprobs`` (when requested) holds, per generated token, a dict token id → logprob with the
    top-N tokens plus the sampled one. ``stop_reason`` is the stop string or stop token id that
    ended generation (None for EOS / length).
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Result (or, when streaming, progress) of one request.

    ``error`` is set (and every completion's ``finish_reason`` is ``"error"``) when the engine
    failed this request alone, e.g. an exception in a step that concerned only it; the message
    is meant for the caller and carries no traceback.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = field(default=None, repr=False)
    error: str | None = None
