"""Engine outputs → OpenAI response JSON (plain dicts: the streaming path builds one per token).

Kept free of I/O so the mapping can be read and tested on its own.
"""

from __future__ import annotations

import time
from typing import Any

from minivllm.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def token_str(tokenizer: Any, token_id: int) -> str:
    """How a token id is shown in logprobs (``token_id:N`` when there is no tokenizer, as vLLM)."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id])


def _token(tokenizer: Any, token_id: int, lp: Logprob | None) -> str:
    # The engine decoded the token already (same ``decode([id])`` as token_str).
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return token_str(tokenizer, token_id)


def _ranked(step: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    """One step's (token id, Logprob) pairs, most likely first."""
    return sorted(step.items(), key=lambda x: -x[1].logprob)


def completion_logprobs(c: CompletionOutput, tokenizer: Any,
                        echoed: tuple[list[int], PromptLogprobs] | None = None,
                        num_top: int | None = None) -> dict[str, Any] | None:
    """The legacy completions logprobs object (tokens, token_logprobs, top_logprobs, text_offset).

    ``echoed``: with ``echo``, the prompt's token ids and prompt logprobs, listed before the
    completion's tokens (the first prompt token has no logprob: null entries, as in vLLM).
    ``num_top`` keeps, at each token, only the ``num_top`` most likely plus the token itself.
    """
    if c.logprobs is None:
        return None
    tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
    steps = list(zip(*echoed)) if echoed is not None else []
    for tid, step in steps + list(zip(c.token_ids, c.logprobs)):
        own = step.get(tid) if step is not None else None
        s = _token(tokenizer, tid, own)
        tokens.append(s)
        token_lps.append(own.logprob if own is not None else None)
        if step is None:
            tops.append(None)
        else:
            tops.append({_token(tokenizer, t, lp): lp.logprob for t, lp in _ranked(step)
                         if num_top is None or t == tid or (lp.rank or 0) <= num_top})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs_json(plp: PromptLogprobs | None, tokenizer: Any) -> list[Any] | None:
    """vLLM's ``choices[i].prompt_logprobs``: null for the first prompt token, then per token
    ``{"<token id>": {"logprob", "rank", "decoded_token"}}``."""
    if plp is None:
        return None
    return [None if step is None else
            {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": _token(tokenizer, t, lp)}
             for t, lp in step.items()} for step in plp]


def _chat_entry(tokenizer: Any, token_id: int, lp: Logprob | None) -> dict[str, Any]:
    s = _token(tokenizer, token_id, lp)
    return {"token": s, "logprob": lp.logprob if lp is not None else None,
            "bytes": list(s.encode("utf-8", errors="replace"))}


def chat_logprobs(c: CompletionOutput, tokenizer: Any, num_top: int) -> dict[str, Any] | None:
    """The chat logprobs object: per token ``{token, logprob, bytes, top_logprobs}``.

    The engine returns the top ``num_top`` tokens plus the sampled one; ``top_logprobs`` is the
    ``num_top`` most likely (the sampled token among them whenever it ranks there).
    """
    if c.logprobs is None:
        return None
    content = []
    for tid, step in zip(c.token_ids, c.logprobs):
        entry = _chat_entry(tokenizer, tid, step.get(tid))
        entry["top_logprobs"] = [_chat_entry(tokenizer, t, lp) for t, lp in _ranked(step)[:num_top]]
        content.append(entry)
    return {"content": content}


def _completion_choice(index: int, out: RequestOutput, c: CompletionOutput, tokenizer: Any, prefix: str | None,
                       num_logprobs: int | None) -> dict[str, Any]:
    """``prefix``: the echoed prompt text (None without echo)."""
    echoed = (out.prompt_token_ids, out.prompt_logprobs) if prefix is not None and out.prompt_logprobs else None
    return {"index": index, "text": (prefix or "") + c.text,
            "logprobs": completion_logprobs(c, tokenizer, echoed, num_logprobs),
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason, "token_ids": c.token_ids,
            "prompt_logprobs": prompt_logprobs_json(out.prompt_logprobs, tokenizer)}


def completion_response(rid: str, model: str, outs: list[RequestOutput], tokenizer: Any, n: int,
                        echo_prefixes: list[str] | None = None, num_logprobs: int | None = None) -> dict[str, Any]:
    """One response for one prompt or a batch: prompt ``i``'s choice ``j`` has index ``i * n + j``."""
    choices = [_completion_choice(i * n + c.index, out, c, tokenizer, echo_prefixes[i] if echo_prefixes else None,
                                  num_logprobs)
               for i, out in enumerate(outs) for c in out.outputs]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices,
            "usage": usage(sum(len(o.prompt_token_ids) for o in outs),
                           sum(len(c.token_ids) for o in outs for c in o.outputs))}


def chat_response(rid: str, model: str, out: RequestOutput, tokenizer: Any,
                  num_top_logprobs: int | None) -> dict[str, Any]:
    """A whole chat completion; ``num_top_logprobs`` None when logprobs were not asked for."""
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": (chat_logprobs(c, tokenizer, num_top_logprobs)
                             if num_top_logprobs is not None else None),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices,
            "usage": usage(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs))}


def completion_chunk(rid: str, model: str, created: int, index: int, c: CompletionOutput,
                     tokenizer: Any, prefix: str = "", prompt_logprobs: PromptLogprobs | None = None,
                     echoed: tuple[list[int], PromptLogprobs] | None = None) -> dict[str, Any]:
    """One streamed ``/v1/completions`` chunk for choice ``index``; ``prompt_logprobs`` go in the
    first chunk of each choice, ``echoed`` prompt tokens lead the logprobs of the echo chunk."""
    choice = {"index": index, "text": prefix + c.text, "logprobs": completion_logprobs(c, tokenizer, echoed),
              "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
    if prompt_logprobs is not None:
        choice["prompt_logprobs"] = prompt_logprobs_json(prompt_logprobs, tokenizer)
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict[str, Any],
               finish_reason: str | None = None, logprobs: dict[str, Any] | None = None,
               stop_reason: int | str | None = None) -> dict[str, Any]:
    """One streamed chat chunk for choice ``index`` (``delta``: role and / or content)."""
    choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs,
                              "finish_reason": finish_reason}
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice]}


def usage_chunk(rid: str, obj: str, model: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, only usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def delta_chunks(rid: str, model: str, created: int, index: int, c: CompletionOutput, tokenizer: Any,
                 chat: bool, num_top_logprobs: int | None,
                 prompt_logprobs: PromptLogprobs | None = None) -> list[dict[str, Any]]:
    """The SSE chunks for one completion's delta (none while text is held back for a stop string).
    ``prompt_logprobs`` (completions): a chunk is sent for them even without new text."""
    has_new = bool(c.text) or (c.logprobs is not None and bool(c.token_ids))
    if not chat:
        if has_new or c.finish_reason is not None or prompt_logprobs is not None:
            return [completion_chunk(rid, model, created, index, c, tokenizer, prompt_logprobs=prompt_logprobs)]
        return []
    chunks = []
    if has_new:
        lps = chat_logprobs(c, tokenizer, num_top_logprobs) if num_top_logprobs is not None else None
        chunks.append(chat_chunk(rid, model, created, index, {"content": c.text}, None, lps))
    if c.finish_reason is not None:
        chunks.append(chat_chunk(rid, model, created, index, {}, c.finish_reason, None, c.stop_reason))
    return chunks
