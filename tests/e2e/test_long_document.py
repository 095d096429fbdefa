"""examples/summarize_long_document.py: a text longer than the context is summarised in
overlapping windows (one batch), then the summaries are summarised."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "summarize_long_document.py"


def _example():
    """The example script as a module (registered first: its dataclasses look themselves up)."""
    name = "examples_summarize_long_document"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _EXAMPLE)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_overlapping_windows_cover_the_text_with_the_overlap():
    ex = _example()
    ids = list(range(23))
    assert ex.overlapping_windows(ids, 8, 3) == [ids[0:8], ids[5:13], ids[10:18], ids[15:23]]
    assert ex.overlapping_windows(ids[:8], 8, 3) == [ids[:8]]
    with pytest.raises(ValueError, match="overlap"):
        ex.overlapping_windows(ids, 4, 4)


def test_text_longer_than_the_context_is_summarised(smol_llm):
    # The shared engine (long max_model_len, loaded once) with a small context bound: a few
    # short prompts keep this fast on CPU while exercising exactly the same windowing.
    ex = _example()
    context, overlap = 96, 8
    text = " ".join(ex.FALLBACK.split(". ")[:3])
    res = ex.summarize_long_document(smol_llm, text, max_tokens=4, overlap_tokens=overlap,
                                     instruction="Summarise.", context_tokens=context)

    ids = smol_llm.get_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert res.num_document_tokens == len(ids) > context
    # Windows: overlapping by `overlap` tokens, covering the whole document in order, each
    # short enough that template + window + summary fit the context.
    assert len(res.windows) >= 3
    rebuilt = list(res.windows[0])
    for prev, win in zip(res.windows, res.windows[1:]):
        assert win[:overlap] == prev[-overlap:]
        rebuilt += win[overlap:]
    assert rebuilt == ids
    assert max(len(w) for w in res.windows) + 4 < context
    # Round 0: one summary per window; the last round: the single final summary.
    assert len(res.rounds[0]) == len(res.windows)
    assert all(res.rounds[0])
    assert len(res.rounds) >= 2 and res.rounds[-1] == [res.summary] and res.summary


def test_too_small_a_context_is_a_clear_error(smol_llm):
    ex = _example()
    with pytest.raises(ValueError, match="too small"):
        ex.summarize_long_document(smol_llm, ex.FALLBACK, max_tokens=32, context_tokens=64)
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        ex.summarize_long_document(smol_llm, ex.FALLBACK, context_tokens=10**7)
