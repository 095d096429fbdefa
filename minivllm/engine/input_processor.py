"""Frontend side of a request: validate and tokenize prompts, fan ``n > 1`` out into sequences."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Union

from minivllm.engine.request import Request
from minivllm.sampling_params import SEED_MAX, SamplingParams

# Seeds of the completions of an ``n > 1`` request are spaced this far apart.
_CHILD_SEED_STRIDE = 1_000_003

PromptType = Union[str, list[int], dict[str, Any]]


def as_prompt_list(prompts: Any) -> list[PromptType]:
    """One prompt (text, token ids, dict) or a list of them → a non-empty list.

    Raises:
        ValueError: an empty list, or something that is not a prompt.
    """
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("no prompts given (an empty list)")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)
    raise ValueError(f"prompts must be a str, token ids, a dict or a list of them, got {type(prompts).__name__}")


@dataclass
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]


def child_request_id(request_id: str, index: int) -> str:
    """Engine-core id of completion ``index`` of a request (one sequence each)."""
    return f"{index}:{request_id}"


def child_seed(seed: int, index: int) -> int:
    """Seed of completion ``index``: distinct per completion, and (wrapping around 2**64)
    still a value ``torch.Generator.manual_seed`` accepts whatever the user's seed was."""
    value = seed + index * _CHILD_SEED_STRIDE
    return value - 2**64 if value > SEED_MAX else value


def check_text(text: str, what: str) -> None:
    """Raise ValueError for text that no tokenizer can take (lone surrogates, which JSON
    ``\\ud800`` escapes produce): the tokenizer would fail with a TypeError instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be valid Unicode (it contains a lone surrogate)") from None


class InputProcessor:
    """Turns user prompts into validated token ids and engine-core ``Request`` objects."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids

    def process_prompt(self, prompt: PromptType) -> ProcessedPrompt:
        """Raises ValueError for an empty prompt, bad ids, or text without a tokenizer."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                self._check_ids(ids)
                return ProcessedPrompt(prompt.get("prompt"), list(ids))
            if "prompt" in prompt:
                return self.process_prompt(prompt["prompt"])
            raise ValueError("a dict prompt needs 'prompt_token_ids' or 'prompt'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            check_text(prompt, "prompt")
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids instead "
                                 "(skip_tokenizer_init=True or the model has no tokenizer)")
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise ValueError("prompt tokenized to zero tokens")
            return ProcessedPrompt(prompt, ids)
        if isinstance(prompt, (list, tuple)):
            self._check_ids(prompt)
            return ProcessedPrompt(None, list(prompt))
        raise ValueError(f"a prompt must be a str, a list of token ids or a dict, got {type(prompt).__name__}")

    def _check_ids(self, ids: Any) -> None:
        if not isinstance(ids, (list, tuple)):
            raise ValueError("prompt_token_ids must be a list of integers")
        if not ids:
            raise ValueError("prompt token list must not be empty")
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool):
                raise ValueError(f"prompt token ids must be integers, got {t!r}")
            if t < 0 or t >= self.vocab_size:
                raise ValueError(f"token id {t} is out of vocabulary (valid: 0..{self.vocab_size - 1})")

    def check_params(self, params: SamplingParams) -> None:
        """Raise ValueError for token ids in ``params`` that this model cannot sample
        (``logit_bias``, ``allowed_token_ids``; see ``SamplingParams.check_token_ids``)."""
        params.check_token_ids(self.vocab_size, self.eos_token_ids)

    def make_requests(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                      arrival_time: float | None = None) -> list[Request]:
        """One engine ``Request`` per completion. Seeded ``n > 1`` completions get distinct,
        reproducible seeds."""
        now = time.time() if arrival_time is None else arrival_time
        reqs = []
        for i in range(params.n):
            seed = None if params.seed is None else child_seed(params.seed, i)
            reqs.append(Request(
                request_id=child_request_id(request_id, i),
                prompt_token_ids=list(prompt.prompt_token_ids), params=params, arrival_time=now,
                eos_token_ids=self.eos_token_ids, seed=seed))
        return reqs
