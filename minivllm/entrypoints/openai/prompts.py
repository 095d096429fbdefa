"""Prompts from requests: size limits first, then tokenization and chat templates off the event loop.

Text is measured in characters before any tokenizer sees it (a 30 MB prompt is refused in
microseconds), and tokenizing or rendering runs on one worker thread owned by the server, so
``/health`` and every stream keep being served while a long prompt is encoded. One thread also
means the tokenizer is never used from two of our threads at once.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from minivllm.entrypoints.openai.protocol import RequestError
from minivllm.tokenizer import normalize_messages

# Keyword arguments of apply_chat_template that a client must not set through chat_template_kwargs.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens"})


@dataclass
class Prompt:
    """A prompt ready for the engine: its text (when known) and token ids."""

    text: str | None
    token_ids: list[int]

    def engine_input(self) -> dict[str, Any]:
        return {"prompt_token_ids": self.token_ids, "prompt": self.text}


def message_chars(messages: list[Any]) -> int:
    """Characters of text in OpenAI messages (what the template will get), without validating."""
    total = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p["text"]) for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total


class PromptPreparer:
    """Turns request prompts into token ids under the server's limits."""

    def __init__(self, tokenizer: Any, max_model_len: int, vocab_size: int | None, max_prompt_chars: int,
                 chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_prompt_chars = max_prompt_chars
        self.chat_template = chat_template
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="minivllm-tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def check_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_prompt_chars:
            raise RequestError(f"prompt is {num_chars} characters, over this server's limit of "
                               f"{self.max_prompt_chars} (--max-prompt-chars)", param=param)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """vLLM's context-length errors (same wording, so clients that parse them keep working)."""
        L = self.max_model_len
        if num_prompt_tokens >= L:
            raise RequestError(f"This model's maximum context length is {L} tokens. However, your request "
                               f"has {num_prompt_tokens} input tokens. Please reduce the length of the "
                               "input messages.", param="messages")
        if max_tokens is not None and num_prompt_tokens + max_tokens > L:
            raise RequestError(f"This model's maximum context length is {L} tokens. However, you requested "
                               f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, "
                               f"{max_tokens} in the completion). Please reduce the length of the messages "
                               "or completion.", param="max_tokens")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        if self.vocab_size is None:
            return
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise RequestError(f"token id {t} is out of vocabulary (valid: 0..{self.vocab_size - 1})",
                                   param=param)

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise RequestError("text prompts need a tokenizer, and this model has none; send token ids")
        return self.tokenizer

    async def completion_prompt(self, prompt: str | list[int], add_special_tokens: bool,
                                truncate_to: int | None, max_tokens: int | None) -> Prompt:
        """One completions prompt (text or token ids), tokenized, truncated, checked to fit."""
        if isinstance(prompt, str):
            self.check_chars(len(prompt), "prompt")
            tok = self._need_tokenizer()
            ids = await self._off_loop(lambda: tok.encode(prompt, add_special_tokens=add_special_tokens))
            if not ids:
                raise RequestError("prompt tokenized to zero tokens", param="prompt")
            text: str | None = prompt
        else:
            ids, text = prompt, None
        if truncate_to is not None:
            ids = ids[-truncate_to:]
        self.check_fits(len(ids), max_tokens)
        if text is None:  # after the length check: the loop is then bounded by max_model_len
            self.check_token_ids(ids, "prompt")
        return Prompt(text, list(ids))

    async def chat_prompt(self, messages: list[Any], add_generation_prompt: bool, continue_final_message: bool,
                          template_kwargs: dict[str, Any] | None, add_special_tokens: bool,
                          truncate_to: int | None, max_tokens: int | None) -> Prompt:
        """The conversation through the chat template (``--chat-template`` or the tokenizer's)."""
        self.check_chars(message_chars(messages), "messages")
        tok = self._need_tokenizer()
        template = self.chat_template or getattr(tok, "chat_template", None)
        if not template:
            raise RequestError("this model's tokenizer has no chat template (start the server with "
                               "--chat-template, or use /v1/completions)", param="messages")
        kwargs = dict(template_kwargs or {})
        bad = sorted(_RESERVED_TEMPLATE_KWARGS & set(kwargs))
        if bad:
            raise RequestError(f"chat_template_kwargs may not set {', '.join(bad)}", param="chat_template_kwargs")
        try:
            msgs = normalize_messages(messages)
        except ValueError as e:
            raise RequestError(str(e), param="messages") from None
        if continue_final_message and msgs[-1]["role"] != "assistant":
            raise RequestError("continue_final_message needs the last message to be from the assistant",
                               param="continue_final_message")

        def render() -> tuple[str, list[int]]:
            text = tok.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message, **kwargs)
            return text, tok(text, add_special_tokens=add_special_tokens)["input_ids"]

        try:
            text, ids = await self._off_loop(render)
        except RequestError:
            raise
        except Exception as e:  # jinja's TemplateError, raise_exception() in templates, bad kwargs
            if type(e).__module__.startswith("jinja2") or isinstance(e, (ValueError, TypeError)):
                raise RequestError(f"chat template failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                                   param="messages") from None
            raise
        if not ids:
            raise RequestError("the conversation rendered to zero tokens", param="messages")
        if truncate_to is not None:
            ids = ids[-truncate_to:]
        self.check_fits(len(ids), max_tokens)
        return Prompt(text, list(ids))

    async def decode(self, ids: list[int]) -> str:
        tok = self._need_tokenizer()
        self.check_token_ids(ids, "tokens")
        return await self._off_loop(lambda: tok.decode(ids))

    async def token_strs(self, ids: list[int]) -> list[str]:
        tok = self._need_tokenizer()
        return await self._off_loop(lambda: tok.convert_ids_to_tokens(ids))
