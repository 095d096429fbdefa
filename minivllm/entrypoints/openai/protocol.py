"""OpenAI / vLLM request bodies as pydantic models, and the rule that every field is honoured or refused.

A model declares exactly the fields we implement. Anything else in the body lands in
``model_extra``: if the OpenAI or vLLM API defines it (``REFUSED_*`` below) and it asks for
something, the request gets 400 naming the field; a field neither API defines is ignored, as
OpenAI does. Parsing is strict (``true`` is not ``1``, ``"1"`` is not ``1``) and every integer
is bounded to int64 where it enters, so nothing a client sends can overflow further down.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from minivllm.sampling_params import SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
PositiveInt64 = Annotated[int, Field(ge=1, le=INT64_MAX)]
NonNegInt64 = Annotated[int, Field(ge=0, le=INT64_MAX)]

# OpenAI's default for /v1/completions is 16; chat has no cap (None = up to max_model_len).
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_LOGPROBS = 20


class RequestError(ValueError):
    """A request the client got wrong; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400, error_type: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.param = param


def error_body(message: str, error_type: str = "invalid_request_error", code: int = 400,
               param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    """A fresh response / request id such as ``cmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


# ---- refused fields ---------------------------------------------------------------------------
def _falsy(v: Any) -> bool:
    return v is None or v is False or v == [] or v == {} or v == ""


def _refuse(why: str, inert: Callable[[Any], bool] = _falsy) -> tuple[Callable[[Any], bool], str]:
    return inert, why


_STRUCTURED = "structured output is not supported yet"
_COMMON_REFUSED = {
    "response_format": _refuse(_STRUCTURED, lambda v: _falsy(v) or v == {"type": "text"}),
    "structured_outputs": _refuse(_STRUCTURED),
    "guided_json": _refuse(_STRUCTURED),
    "guided_regex": _refuse(_STRUCTURED),
    "guided_choice": _refuse(_STRUCTURED),
    "guided_grammar": _refuse(_STRUCTURED),
    "guided_decoding_backend": _refuse(_STRUCTURED),
    "guided_whitespace_pattern": _refuse(_STRUCTURED),
    "use_beam_search": _refuse("beam search is not supported"),
    "length_penalty": _refuse("length_penalty (beam search) is not supported", lambda v: v in (None, 1, 1.0)),
    "bad_words": _refuse("bad_words is not supported"),
    "logits_processors": _refuse("logits_processors are not supported"),
    "spaces_between_special_tokens": _refuse("spaces_between_special_tokens=false is not supported",
                                             lambda v: v is None or v is True),
    "return_tokens_as_token_ids": _refuse("return_tokens_as_token_ids is not supported"),
    "prompt_embeds": _refuse("prompt_embeds are not supported"),
    "priority": _refuse("request priorities are not supported", lambda v: v in (None, 0)),
    "request_id": _refuse("client-chosen request ids are not supported"),
    "kv_transfer_params": _refuse("kv_transfer_params are not supported"),
    "vllm_xargs": _refuse("vllm_xargs are not supported"),
    "cache_salt": _refuse("cache_salt is not supported"),
    "lora_request": _refuse("LoRA adapters are not supported"),
    "mm_processor_kwargs": _refuse("multimodal inputs are not supported"),
}
REFUSED_COMPLETION_FIELDS = {
    **_COMMON_REFUSED,
    "suffix": _refuse("suffix (fill-in-the-middle) is not supported"),
}
REFUSED_CHAT_FIELDS = {
    **_COMMON_REFUSED,
    "tools": _refuse("tools / function calling is not supported yet"),
    "tool_choice": _refuse("tools / function calling is not supported yet", lambda v: v in (None, "none")),
    "functions": _refuse("functions / function calling is not supported"),
    "function_call": _refuse("functions / function calling is not supported", lambda v: v in (None, "none")),
    "audio": _refuse("audio output is not supported"),
    "modalities": _refuse("only text output is supported", lambda v: v in (None, ["text"])),
    "prediction": _refuse("predicted outputs are not supported"),
    "web_search_options": _refuse("web search is not supported"),
    "documents": _refuse("documents (RAG templates) are not supported"),
    "chat_template": _refuse("a per-request chat_template is not supported; start the server "
                             "with --chat-template"),
    "echo": _refuse("echo is not supported for chat completions"),
    "prompt_logprobs": _refuse("prompt_logprobs is supported on /v1/completions only"),
    "reasoning_effort": _refuse("reasoning_effort is not supported"),
}


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` is implemented."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Request(BaseModel):
    """Fields and parsing rules shared by completions and chat."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: PositiveInt64 = 1
    best_of: PositiveInt64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int64] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: NonNegInt64 | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    add_special_tokens: bool | None = None
    truncate_prompt_tokens: PositiveInt64 | None = None
    # OpenAI's: JSON object keys are strings, {"50256": -100}; ints once parsed (``token_logit_bias``).
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[Int64] | None = None  # vLLM's extension

    refused_fields: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {}

    def check_refused(self) -> None:
        """400 for a known API field we do not implement, when it asks for something."""
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of different from n is not supported", param="best_of")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", param="stream_options")
        for name, value in (self.model_extra or {}).items():
            rule = self.refused_fields.get(name)
            if rule is not None and not rule[0](value):
                raise RequestError(f"'{name}' is not supported: {rule[1]}", param=name)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def token_logit_bias(self) -> dict[int, float] | None:
        """``logit_bias`` keyed by token id; 400 for a key that is not one (or one given twice,
        as "5" and "05")."""
        if self.logit_bias is None:
            return None
        bias: dict[int, float] = {}
        for key, value in self.logit_bias.items():
            # Plain ASCII digits only: int() would also take "+5", " 5", "5_0" and "٥".
            if not (key.isascii() and key.isdigit() and len(key) <= 19):
                raise RequestError(f"logit_bias keys must be token ids (non-negative integers), got "
                                   f"{key[:40]!r}", param="logit_bias")
            token = int(key)
            if token in bias:
                raise RequestError(f"logit_bias has token id {token} more than once", param="logit_bias")
            bias[token] = value
        return bias

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's view of this request (ValueError → 400 for out-of-range values)."""
        names = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos",
                 "min_tokens", "skip_special_tokens", "include_stop_str_in_output", "allowed_token_ids")
        kwargs = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        bias = self.token_logit_bias()
        if bias:  # {} asks for nothing (OpenAI clients send it as a default)
            kwargs["logit_bias"] = bias
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                  **kwargs)
        except (TypeError, OverflowError) as e:
            raise RequestError(f"bad sampling parameters: {e}") from e
        except ValueError as e:
            # SamplingParams' messages start with the field they are about.
            field = str(e).split(" ", 1)[0].rstrip(":")
            raise RequestError(str(e), param=field if field in kwargs else None) from e


class CompletionRequest(_Request):
    """``POST /v1/completions``. ``prompt``: a string, a list of token ids, or a batch of either."""

    prompt: Any = None
    max_tokens: PositiveInt64 | None = DEFAULT_COMPLETION_MAX_TOKENS
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    # vLLM's extension: the prompt tokens' logprobs (plus the top-N) in ``choices[i].prompt_logprobs``.
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    refused_fields: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = REFUSED_COMPLETION_FIELDS

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request, validated in shape (one for a single prompt)."""
        p = self.prompt
        if p is None:
            raise RequestError("missing required field 'prompt'", param="prompt")
        if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
            prompts = list(p)
        else:
            prompts = [p]
        for x in prompts:
            if isinstance(x, str):
                if not x:
                    raise RequestError("prompt must not be empty", param="prompt")
            elif isinstance(x, list):
                if not x:
                    raise RequestError("prompt must not be empty", param="prompt")
                if not all(isinstance(t, int) and not isinstance(t, bool) for t in x):
                    raise RequestError("prompt must be a string, a list of token ids, or a list of "
                                       "either (a batch)", param="prompt")
            else:
                raise RequestError("prompt must be a string or a list of token ids", param="prompt")
        return prompts

    def check_refused(self) -> None:
        super().check_refused()
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            raise RequestError("continuous_usage_stats is not supported", param="stream_options")


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: OpenAI messages; ``max_completion_tokens`` wins over ``max_tokens``."""

    messages: list[dict[str, Any]] = Field(default_factory=list)
    max_tokens: PositiveInt64 | None = None
    max_completion_tokens: PositiveInt64 | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    refused_fields: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = REFUSED_CHAT_FIELDS

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """What the engine should return: top-N plus the sampled token, or None."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def check_refused(self) -> None:
        super().check_refused()
        if not self.messages:
            raise RequestError("messages must be a non-empty list", param="messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise RequestError("continue_final_message and add_generation_prompt cannot both be true "
                               "(set add_generation_prompt=false)", param="continue_final_message")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            raise RequestError("continuous_usage_stats is not supported", param="stream_options")


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: a ``prompt`` or chat ``messages`` (rendered through the template)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``: token ids back to text."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    tokens: list[NonNegInt64]


def parse_request(model: type[BaseModel], body: bytes) -> Any:
    """Parse and validate a JSON body into ``model``; RequestError (400) naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False, include_context=False)
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = first["loc"]
        # The field, then list indices; union member tags (``str``, ``list[int]``) say nothing.
        field = str(loc[0]) if loc else None
        where = (field or "") + "".join(f"[{x}]" for x in loc[1:] if isinstance(x, int))
        if len(loc) > 1 and isinstance(loc[-1], str) and isinstance(first["loc"][0], str) \
                and first.get("type") in ("extra_forbidden", "missing"):
            where += f".{loc[-1]}"  # a nested object's field: name it
        message = f"{where}: {first['msg']}" if where else first["msg"]
        if first.get("type") == "model_type":
            message = "request body must be a JSON object"
        raise RequestError(message, param=field) from None
