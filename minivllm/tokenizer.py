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


def render_chat(tokenizer, messages: Any) -> str:
    """The prompt text for a conversation, through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use generate() with a prompt")
    return tokenizer.apply_chat_template(normalize_messages(messages), tokenize=False,
                                         add_generation_prompt=True)
