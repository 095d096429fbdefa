"""OpenAI wire format: request bodies → engine inputs, engine outputs → response JSON.

Kept free of I/O so the mapping can be read (and tested) on its own. Unknown request fields
are ignored, as OpenAI clients send many we have no use for (``user``, ``store``, ...);
known fields with bad values raise ``RequestError`` → HTTP 400.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from minivllm.outputs import CompletionOutput, RequestOutput
from minivllm.sampling_params import SamplingParams

# OpenAI's default for /v1/completions is 16; chat has no cap (None = up to max_model_len).
DEFAULT_COMPLETION_MAX_TOKENS = 16

# Request field → SamplingParams field, for the ones that pass straight through.
_PASSTHROUGH = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "presence_penalty",
                "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens",
                "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output")


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


def parse_json_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or RequestError."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}") from e
    if not isinstance(payload, dict):
        raise RequestError("request body must be a JSON object")
    return payload


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class ParsedRequest:
    """What the server hands the engine for one completions / chat request."""

    prompt: Any  # str or list of token ids (completions); None for chat
    messages: list[dict[str, Any]] | None
    params: SamplingParams
    stream: bool
    include_usage: bool
    chat_logprobs: bool  # chat: return logprobs in chat format
    prompts: list[Any] | None = None  # completions with a batch of prompts (then prompt is None)


_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")


def _sampling_params(body: dict[str, Any], max_tokens: Any, logprobs: Any) -> SamplingParams:
    for name in _BOOL_FIELDS:  # SamplingParams would take any truthy value here
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise RequestError(f"{name} must be a boolean, got {body[name]!r}", param=name)
    kwargs = {k: body[k] for k in _PASSTHROUGH if body.get(k) is not None}
    kwargs["max_tokens"] = max_tokens
    kwargs["logprobs"] = logprobs
    try:
        return SamplingParams(**kwargs)
    except TypeError as e:  # e.g. a JSON object where a number belongs, caught late
        raise RequestError(f"bad sampling parameters: {e}") from e
    except ValueError as e:
        raise RequestError(str(e)) from e


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", param="stream_options")
    return stream, bool(options.get("include_usage", False))


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt must not be empty", param="prompt")
    elif isinstance(prompt, list):
        if not prompt:
            raise RequestError("prompt must not be empty", param="prompt")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise RequestError("prompt must be a string, a list of token ids, or a list of "
                               "either (a batch)", param="prompt")
    else:
        raise RequestError("prompt must be a string or a list of token ids", param="prompt")


def parse_completion_request(body: dict[str, Any]) -> ParsedRequest:
    """``/v1/completions``: prompt is a string, a list of token ids, or a batch (a list of
    either); a batch's choices are numbered prompt by prompt (``i * n + j``)."""
    if "prompt" not in body:
        raise RequestError("missing required field 'prompt'", param="prompt")
    prompt = body["prompt"]
    prompts = None
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) == 1:
            prompt = prompt[0]  # a batch of one, as some clients always send
        else:
            prompts = list(prompt)
            for p in prompts:
                _check_prompt(p)
            prompt = None
    if prompts is None:
        _check_prompt(prompt)
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)):
        raise RequestError("logprobs must be an integer for /v1/completions", param="logprobs")
    max_tokens = body.get("max_tokens", DEFAULT_COMPLETION_MAX_TOKENS)
    stream, include_usage = _stream_flags(body)
    return ParsedRequest(prompt, None, _sampling_params(body, max_tokens, logprobs), stream,
                         include_usage, chat_logprobs=False, prompts=prompts)


def parse_chat_request(body: dict[str, Any]) -> ParsedRequest:
    """``/v1/chat/completions``: OpenAI messages; ``max_completion_tokens`` wins over ``max_tokens``."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError("each message must be an object with a 'role'", param="messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    want_logprobs = body.get("logprobs", False)
    if not isinstance(want_logprobs, bool):
        raise RequestError("logprobs must be a boolean for chat; use top_logprobs for N",
                           param="logprobs")
    top = body.get("top_logprobs")
    logprobs = (top if top is not None else 0) if want_logprobs else None
    stream, include_usage = _stream_flags(body)
    return ParsedRequest(None, messages, _sampling_params(body, max_tokens, logprobs), stream,
                         include_usage, chat_logprobs=want_logprobs)


# ---- responses ------------------------------------------------------------------------------
def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def _token_str(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id])


def completion_logprobs(c: CompletionOutput, tokenizer: Any) -> dict[str, Any] | None:
    """The legacy completions logprobs object (tokens, token_logprobs, top_logprobs)."""
    if c.logprobs is None:
        return None
    tokens, token_lps, tops = [], [], []
    for tid, lps in zip(c.token_ids, c.logprobs):
        tokens.append(_token_str(tokenizer, tid))
        token_lps.append(lps.get(tid))
        tops.append({_token_str(tokenizer, t): lp for t, lp in lps.items()})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops}


def chat_logprobs(c: CompletionOutput, tokenizer: Any) -> dict[str, Any] | None:
    """The chat logprobs object: ``{"content": [{token, logprob, top_logprobs}]}``."""
    if c.logprobs is None:
        return None
    content = []
    for tid, lps in zip(c.token_ids, c.logprobs):
        content.append({"token": _token_str(tokenizer, tid), "logprob": lps.get(tid),
                        "top_logprobs": [{"token": _token_str(tokenizer, t), "logprob": lp}
                                         for t, lp in lps.items() if t != tid]})
    return {"content": content}


def completion_response(rid: str, model: str, out: RequestOutput, tokenizer: Any) -> dict[str, Any]:
    choices = [{"index": c.index, "text": c.text, "logprobs": completion_logprobs(c, tokenizer),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                "token_ids": c.token_ids} for c in out.outputs]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices,
            "usage": usage(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs))}


def completion_batch_response(rid: str, model: str, outs: list[RequestOutput], tokenizer: Any,
                              n: int) -> dict[str, Any]:
    """One response for a batch of prompts: prompt ``i``'s choice ``j`` has index ``i * n + j``."""
    choices = [{"index": i * n + c.index, "text": c.text, "logprobs": completion_logprobs(c, tokenizer),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason, "token_ids": c.token_ids}
               for i, out in enumerate(outs) for c in out.outputs]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices,
            "usage": usage(sum(len(o.prompt_token_ids) for o in outs),
                           sum(len(c.token_ids) for o in outs for c in o.outputs))}


def chat_response(rid: str, model: str, out: RequestOutput, tokenizer: Any,
                  with_logprobs: bool) -> dict[str, Any]:
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c, tokenizer) if with_logprobs else None,
                "finish_reason": c.finish_reason} for c in out.outputs]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices,
            "usage": usage(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs))}


def completion_chunk(rid: str, model: str, created: int, c: CompletionOutput, tokenizer: Any,
                     ) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": c.index, "text": c.text,
                         "logprobs": completion_logprobs(c, tokenizer),
                         "finish_reason": c.finish_reason}]}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict[str, Any],
               finish_reason: str | None = None, logprobs: dict[str, Any] | None = None,
               ) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish_reason}]}


def usage_chunk(rid: str, obj: str, model: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, only usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
