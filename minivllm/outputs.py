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
class Logprob:
    """One token's log-probability at one position, as vLLM returns it.

    ``rank`` is 1-based among the whole vocabulary (1: the most likely token; the raw model
    distribution, before temperature, penalties or top-k/top-p). ``decoded_token`` is the
    token's text (None without a tokenizer).
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per generated token: token id → Logprob, the top-N tokens plus the sampled one.
SampleLogprobs = list[dict[int, Logprob]]
# Per prompt token: None for the first (nothing predicts it), then token id → Logprob.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request.

    ``logprobs`` (when requested) holds, per generated token, a dict token id → ``Logprob``
    with the top-N tokens plus the sampled one. ``stop_reason`` is the stop string or stop
    token id that ended generation (None for EOS / length).
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None

    def finished(self) -> bool:
        """Whether this completion has ended (a method, as in vLLM)."""
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
    # With ``SamplingParams.prompt_logprobs``: None for the first prompt token, then per prompt
    # token ``{token id: Logprob}`` with that token (its rank over the whole vocabulary) and the
    # top-N. None when not asked for (and, in delta outputs, after the first that carried them).
    prompt_logprobs: PromptLogprobs | None = None
