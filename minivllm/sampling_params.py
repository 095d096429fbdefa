"""Sampling parameters: validated once at construction, then treated as read-only."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, per request (vLLM-compatible names).

    ``temperature=0`` means greedy. ``top_k=0`` or ``-1`` disables top-k. ``seed`` makes the
    request's sampling reproducible whatever else runs in the same batch. ``logprobs=N``
    returns the top-N log-probabilities (plus the sampled token's) at every step.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0

    def _validate(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        check(is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        check(is_num(self.temperature) and self.temperature >= 0,
              f"temperature must be >= 0, got {self.temperature!r}")
        check(is_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        check(is_int(self.top_k) and (self.top_k >= 0 or self.top_k == -1),
              f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        check(is_num(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        check(self.seed is None or is_int(self.seed), f"seed must be an integer or None, got {self.seed!r}")
        check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
              f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check(is_int(self.min_tokens) and self.min_tokens >= 0,
              f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None:
            check(self.min_tokens <= self.max_tokens,
                  f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        check(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= 20),
              f"logprobs must be an integer in [0, 20] or None, got {self.logprobs!r}")
        check(is_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 2,
              f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        check(is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        check(is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        stop = self.stop
        check(stop is None or isinstance(stop, str)
              or (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)),
              f"stop must be a string or a list of strings, got {stop!r}")
        if isinstance(stop, str):
            stop = [stop]
        check(not stop or all(len(s) > 0 for s in stop), "stop strings must not be empty")
        ids = self.stop_token_ids
        check(ids is None or (isinstance(ids, (list, tuple)) and all(is_int(t) and t >= 0 for t in ids)),
              f"stop_token_ids must be a list of non-negative integers, got {ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
