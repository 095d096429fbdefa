"""Incremental detokenization equals a full decode, token by token, for both strategies."""

from __future__ import annotations

import pytest

from minivllm.engine.detokenizer import IncrementalDetokenizer
from minivllm.tokenizer import load_tokenizer

TEXTS = [
    "Héllo wörld — 你好，世界! 🎉🦀 naïve café",  # multi-byte characters split across tokens
    "  leading spaces\n\ttabs and newlines\n\n",
    "<|im_end|> after a special token",
]


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    return load_tokenizer(smollm_dir)


@pytest.mark.parametrize("strategy", ["stream", "window"])
@pytest.mark.parametrize("skip_special", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer, text, skip_special, strategy):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Prompt: "), skip_special, [], False)
    if strategy == "window":
        detok._stream = None  # the fallback for tokenizers without DecodeStream
    else:
        assert detok._stream is not None
    seen = []
    for token in ids:
        detok.add_tokens([token])
        seen.append(detok.text)
        assert "\ufffd" not in detok.text  # never a half character
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=skip_special)
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))  # text only grows


def test_stop_string_across_tokens(tokenizer):
    ids = tokenizer.encode("one, two, three, four")
    detok = IncrementalDetokenizer(tokenizer, [], True, ["three"], False)
    stops = [detok.add_tokens([t]) for t in ids]
    assert "three" in stops and detok.text == "one, two, "
