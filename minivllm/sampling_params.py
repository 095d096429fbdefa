"""Sampling parameters: validated once at construction, then treated as read-only.

Every value is checked against the range the engine can really use, not only its type: the
values end up in int64 / float32 tensors and ``torch.Generator`` seeds inside an engine step,
where an overflow would fail the whole batch instead of this one request.
"""

from __future__ import annotations

import math
import reprlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

INT64_MAX = 2**63 - 1
# What ``torch.Generator.manual_seed`` accepts: int64 and uint64 values alike.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# Sane caps on what a client may ask for. n matches the OpenAI API's limit; a server may set
# lower ones. Stop lists are scanned at every generated token, so they must stay small.
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
# OpenAI documents logit_bias values in [-100, 100]: enough to force or forbid any token
# (logits are O(10)), small enough that an added bias never overflows float32.
MAX_ABS_LOGIT_BIAS = 100.0
# Positive temperatures below this are raised to it (as vLLM does): logits / T overflows
# float32 for tiny T, and sampling at T = 0.01 is already indistinguishable from greedy.
MIN_TEMPERATURE = 1e-2


def is_int(x: object) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an int to Python, never to a client)."""
    return isinstance(x, int) and not isinstance(x, bool)


def as_float32(x: object) -> float | None:
    """``x`` rounded to float32 as the sampler will see it; None if it is not a finite number
    there (NaN, inf, beyond float32, or not a number at all)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return None
    try:
        value = struct.unpack("f", struct.pack("f", x))[0]
    except (OverflowError, struct.error):
        return None
    return value if math.isfinite(value) else None


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, per request (vLLM-compatible names).

    ``temperature=0`` means greedy (positive values below 0.01 are raised to 0.01).
    ``top_k=0`` or ``-1`` disables top-k. ``seed`` makes the request's sampling reproducible
    whatever else runs in the same batch. ``logprobs=N`` returns the top-N log-probabilities
    (plus the sampled token's) at every step; ``prompt_logprobs=N`` returns, for every prompt
    token after the first, its own log-probability plus the top-N (the request then skips the
    prefix cache: cached tokens have no logits). Bad values raise ValueError naming the field.
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
    prompt_logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
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
        if self.logit_bias is not None:
            # Plain floats: an int bias would otherwise stay an int (and compare unequal after
            # a msgpack round trip that keeps it one).
            self.logit_bias = {t: float(b) for t, b in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE

    def _validate(self) -> None:
        def check(ok: bool, name: str, expected: str) -> None:
            # The message is built only on failure: values may be huge (a 10**5000 int).
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {_short_repr(getattr(self, name))}")

        def int_in(x: Any, lo: int, hi: int) -> bool:
            return is_int(x) and lo <= x <= hi

        def float_in(x: Any, lo: float, hi: float, lo_open: bool = False) -> bool:
            # Checked on the float32 value: 1e-300 is positive in Python but 0 on the device.
            v = as_float32(x)
            return v is not None and (lo < v if lo_open else lo <= v) and v <= hi

        check(int_in(self.n, 1, MAX_N), "n", f"an integer in [1, {MAX_N}]")
        check(float_in(self.temperature, 0, math.inf), "temperature", "a number >= 0 (finite in float32)")
        check(float_in(self.top_p, 0, 1, lo_open=True), "top_p", "in (0, 1]")
        check(int_in(self.top_k, -1, INT64_MAX), "top_k",
              "-1, 0 (disabled) or a positive integer up to 2**63-1")
        check(float_in(self.min_p, 0, 1), "min_p", "in [0, 1]")
        check(self.seed is None or int_in(self.seed, SEED_MIN, SEED_MAX), "seed",
              "None or an integer in [-2**63, 2**64-1]")
        check(self.max_tokens is None or int_in(self.max_tokens, 1, INT64_MAX), "max_tokens",
              "an integer in [1, 2**63-1] or None")
        check(int_in(self.min_tokens, 0, INT64_MAX), "min_tokens", "an integer in [0, 2**63-1]")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        check(self.logprobs is None or int_in(self.logprobs, 0, MAX_LOGPROBS), "logprobs",
              f"an integer in [0, {MAX_LOGPROBS}] or None")
        check(self.prompt_logprobs is None or int_in(self.prompt_logprobs, 0, MAX_LOGPROBS),
              "prompt_logprobs", f"an integer in [0, {MAX_LOGPROBS}] or None")
        check(float_in(self.repetition_penalty, 0, 2, lo_open=True), "repetition_penalty", "in (0, 2]")
        check(float_in(self.presence_penalty, -2, 2), "presence_penalty", "in [-2, 2]")
        check(float_in(self.frequency_penalty, -2, 2), "frequency_penalty", "in [-2, 2]")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            check(isinstance(getattr(self, name), bool), name, "a bool")
        self._validate_stops()
        self._validate_token_restrictions()

    def _validate_stops(self) -> None:
        stop = self.stop
        if not (stop is None or isinstance(stop, str)
                or (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop))):
            raise ValueError(f"stop must be a string or a list of strings, got {_short_repr(stop)}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        for s in stops:
            if not s:
                raise ValueError("stop strings must not be empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings may be at most {MAX_STOP_STRING_CHARS} characters, "
                                 f"got one of {len(s)}")
            if not _is_valid_unicode(s):
                raise ValueError("stop strings must be valid Unicode (no lone surrogates)")
        ids = self.stop_token_ids
        if not (ids is None or (isinstance(ids, (list, tuple))
                                and all(is_int(t) and 0 <= t <= INT64_MAX for t in ids))):
            raise ValueError("stop_token_ids must be a list of integers in [0, 2**63-1], "
                             f"got {_short_repr(ids)}")
        if ids is not None and len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")

    def _validate_token_restrictions(self) -> None:
        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {_short_repr(bias)}")
            for t, b in bias.items():
                if not (is_int(t) and 0 <= t <= INT64_MAX):
                    raise ValueError("logit_bias keys must be token ids (integers in [0, 2**63-1]), "
                                     f"got {_short_repr(t)}")
                v = as_float32(b)
                if v is None or abs(v) > MAX_ABS_LOGIT_BIAS:
                    raise ValueError(f"logit_bias values must be numbers in [-{MAX_ABS_LOGIT_BIAS:g}, "
                                     f"{MAX_ABS_LOGIT_BIAS:g}], got {_short_repr(b)} for token {t}")
        ids = self.allowed_token_ids
        if ids is not None:
            if not (isinstance(ids, (list, tuple))
                    and all(is_int(t) and 0 <= t <= INT64_MAX for t in ids)):
                raise ValueError("allowed_token_ids must be a list of integers in [0, 2**63-1], "
                                 f"got {_short_repr(ids)}")
            if not ids:
                raise ValueError("allowed_token_ids must not be empty (None allows every token)")

    def check_token_ids(self, vocab_size: int, eos_token_ids: Iterable[int] = ()) -> None:
        """Raise ValueError unless this request's ``logit_bias`` / ``allowed_token_ids`` fit a
        model: ids below ``vocab_size``, and not an allowed set that ``min_tokens`` bans whole.

        Called where the vocabulary is known (the frontend's input processor, the engine
        core). The second check needs the model's EOS ids: with ``min_tokens`` the stop and
        EOS ids are banned at first, and an allowed set of only those leaves nothing to sample.
        """
        for name, ids in (("logit_bias", self.logit_bias or ()),
                          ("allowed_token_ids", self.allowed_token_ids or ())):
            for t in ids:
                if not 0 <= t < vocab_size:
                    raise ValueError(f"{name}: token id {t} is out of vocabulary "
                                     f"(valid: 0..{vocab_size - 1})")
        if self.allowed_token_ids and self.min_tokens > 0:
            banned = set(self.stop_token_ids or ())
            if not self.ignore_eos:
                banned |= set(eos_token_ids)
            if set(self.allowed_token_ids) <= banned:
                raise ValueError(f"allowed_token_ids holds only stop/EOS tokens, which min_tokens="
                                 f"{self.min_tokens} forbids until then: nothing could be sampled "
                                 "(allow another token or lower min_tokens)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_valid_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short_repr(x: object, limit: int = 80) -> str:
    """A repr that cannot blow up an error message (clients may send megabytes)."""
    try:
        r = reprlib.repr(x)  # abbreviates long lists without building their full repr
    except ValueError:  # an int beyond Python's digit limit for str()
        return f"<{type(x).__name__} too large to print>"
    return r if len(r) <= limit else r[:limit] + "..."
