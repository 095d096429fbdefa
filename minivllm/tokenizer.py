"""Tokenizer loading and chat-template rendering (HF tokenizers; no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    """The HF tokenizer in ``model_dir``, or None when the directory has none (dummy models).

    ``trust_remote_code`` lets a tokenizer class shipped as code with the model run (HF's flag).
    """
    if not has_tokenizer_files(model_dir):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True,
                                         trust_remote_code=trust_remote_code)


def has_tokenizer_files(directory: Path) -> bool:
    """Whether ``directory`` holds the files of an HF tokenizer."""
    return any((Path(directory) / f).exists() for f in _TOKENIZER_FILES)


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("message content parts must be {'type': 'text', 'text': str}")
            parts.append(part["text"])
        return "".join(parts)
    raise ValueError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """Validate OpenAI-style messages and flatten content parts into plain strings."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation must be a non-empty list of messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError("each message must be a dict with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool", "developer"):
            raise ValueError(f"unknown message role {m['role']!r}")
        out.append({"role": m["role"], "content": _message_text(m["content"])})
    return out


# apply_chat_template arguments that chat_template_kwargs must not override (they have their own
# parameters, or would make the result something other than the prompt text).
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


def render_chat(tokenizer, messages: Any, *, chat_template: str | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """The prompt text for a conversation, through ``chat_template`` or the tokenizer's own.

    ``continue_final_message`` leaves the last (assistant) message open for the model to go on
    with, instead of starting a new reply; ``chat_template_kwargs`` are extra template
    variables (``enable_thinking=False`` for Qwen3, say).

    Raises:
        ValueError: bad messages or arguments, no template, or a template that failed.
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this model's tokenizer has no chat template; pass chat_template= or use "
                         "generate() with a prompt")
    kwargs = dict(chat_template_kwargs or {})
    bad = sorted(RESERVED_TEMPLATE_KWARGS & set(kwargs))
    if bad:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(bad)}")
    msgs = normalize_messages(messages)
    if continue_final_message:
        if add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be True")
        if msgs[-1]["role"] != "assistant":
            raise ValueError("continue_final_message needs the last message to be from the assistant")
    try:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)
    except Exception as e:  # jinja's TemplateError, raise_exception() in templates, bad kwargs
        if type(e).__module__.startswith("jinja2") or isinstance(e, (ValueError, TypeError)):
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"chat template failed: {first_line}") from None
        raise
