"""Summarise a document longer than the model's context: map, then reduce.

    python examples/summarize_long_document.py [path/to/text.txt] [--max-model-len 1024]

The text is cut into overlapping token windows that each fit the context together with the
instruction and the summary's token budget; all windows are summarised in **one batch** (one
``generate`` call: the engine schedules them together), then the window summaries, joined in
order, are summarised again — repeatedly, while they still do not fit one window.

Prompts are built from token ids (the chat template's text before and after the document,
tokenised once, around each window's ids), so every prompt's length is known exactly: no window
can overflow the context after a decode/re-encode round trip.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

from minivllm import LLM, SamplingParams

INSTRUCTION = "Summarise the text above in a few sentences. Keep names and numbers."
_PLACEHOLDER = "\x00DOCUMENT\x00"
# Tokens kept free in each prompt: tokenising the template halves apart from the document can
# differ from tokenising them together by a token or two at each seam.
_SEAM_MARGIN_TOKENS = 4

FALLBACK = " ".join(
    f"Section {i}: The committee reviewed budget line {i}, noted a {i % 7 + 2}% change from last "
    f"year, and asked the treasurer to report back on item {i * 3} before the next meeting."
    for i in range(1, 60))


@dataclass
class LongSummary:
    """The result of :func:`summarize_long_document`.

    Attributes:
        summary: the final summary.
        rounds: the summaries of each round, in document order (round 0: one per window of the
            original text; the last round has exactly one entry, ``summary``).
        windows: the token windows of round 0 (overlapping slices of the document's ids).
        num_document_tokens: length of the document in tokens.
    """

    summary: str
    rounds: list[list[str]] = field(default_factory=list)
    windows: list[list[int]] = field(default_factory=list)
    num_document_tokens: int = 0


def overlapping_windows(ids: list[int], window_tokens: int, overlap_tokens: int) -> list[list[int]]:
    """Slices of ``ids`` of at most ``window_tokens``, each sharing ``overlap_tokens`` with the
    previous one (so a sentence cut at one edge is whole in the neighbour), covering all of ``ids``.

    Raises:
        ValueError: when the overlap is not smaller than the window.
    """
    if window_tokens < 1 or not 0 <= overlap_tokens < window_tokens:
        raise ValueError(f"need 0 <= overlap_tokens ({overlap_tokens}) < window_tokens ({window_tokens})")
    stride = window_tokens - overlap_tokens
    windows = []
    start = 0
    while True:
        windows.append(ids[start:start + window_tokens])
        if start + window_tokens >= len(ids):
            return windows
        start += stride


class _PromptBuilder:
    """Chat prompts ``template-before + window ids + template-after`` as token ids."""

    def __init__(self, llm: LLM, instruction: str) -> None:
        tok = llm.get_tokenizer()
        if tok is None:
            raise ValueError("summarising needs the model's tokenizer")
        self.tokenizer = tok
        if getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": f"{_PLACEHOLDER}\n\n{instruction}"}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model: plain text around the document
            text = f"{_PLACEHOLDER}\n\n{instruction}\n"
        before, after = text.split(_PLACEHOLDER)
        self.before = tok(before, add_special_tokens=False)["input_ids"]
        self.after = tok(after, add_special_tokens=False)["input_ids"]

    @property
    def overhead_tokens(self) -> int:
        return len(self.before) + len(self.after) + _SEAM_MARGIN_TOKENS

    def prompt(self, window: list[int]) -> list[int]:
        return self.before + window + self.after


def summarize_long_document(llm: LLM, text: str, *, max_tokens: int = 128, overlap_tokens: int = 64,
                            max_rounds: int = 8, instruction: str = INSTRUCTION,
                            context_tokens: int | None = None) -> LongSummary:
    """Summarise ``text`` whatever its length, within ``llm``'s context length.

    Args:
        llm: the engine; its ``max_model_len`` bounds every prompt plus its summary.
        text: the document.
        max_tokens: token budget of each summary (greedy decoding).
        overlap_tokens: tokens shared by neighbouring windows.
        max_rounds: give up (ValueError) if the summaries still do not fit after this many rounds.
        instruction: what the model is asked to do with each window.
        context_tokens: bound on each prompt plus its summary (default: ``llm``'s
            ``max_model_len``; a smaller one makes more, shorter prompts).

    Raises:
        ValueError: when the context is too small for the instruction, a window and a summary,
            or the text is empty.
    """
    builder = _PromptBuilder(llm, instruction)
    context = llm.config.scheduler.max_model_len
    if context_tokens is not None:
        if context_tokens > context:
            raise ValueError(f"context_tokens {context_tokens} exceeds max_model_len {context}")
        context = context_tokens
    window_tokens = context - max_tokens - builder.overhead_tokens
    # Each round must shrink the text: a window's summary has to be shorter than its stride.
    if window_tokens - overlap_tokens <= max_tokens:
        raise ValueError(f"a context of {context} tokens is too small: a window of {window_tokens} tokens "
                         f"minus the {overlap_tokens}-token overlap must exceed max_tokens "
                         f"({max_tokens}); lower max_tokens or overlap_tokens")
    ids = builder.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the text is empty")
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    result = LongSummary(summary="", num_document_tokens=len(ids))
    for _ in range(max_rounds):
        windows = overlapping_windows(ids, window_tokens, overlap_tokens)
        if not result.windows:
            result.windows = windows
        # One generate call for all windows of the round: they are prefilled and decoded together.
        outs = llm.generate([builder.prompt(w) for w in windows], params, use_tqdm=False)
        summaries = [o.outputs[0].text.strip() for o in outs]
        result.rounds.append(summaries)
        if len(summaries) == 1:
            result.summary = summaries[0]
            return result
        # The next round reads the summaries in document order; no overlap is needed any more
        # between them, but keeping the same window rule keeps the code one loop.
        ids = builder.tokenizer("\n\n".join(summaries), add_special_tokens=False)["input_ids"]
    raise ValueError(f"the summaries did not fit one window after {max_rounds} rounds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?", help="a text file (default: a generated committee report)")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--max-model-len", type=int, default=1024,
                    help="context length; small by default so the built-in text does not fit")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--overlap-tokens", type=int, default=64)
    args = ap.parse_args()
    text = open(args.path).read() if args.path else FALLBACK
    llm = LLM(args.model, max_model_len=args.max_model_len)
    start = time.perf_counter()
    res = summarize_long_document(llm, text, max_tokens=args.max_tokens, overlap_tokens=args.overlap_tokens)
    print(f"{res.num_document_tokens} document tokens, context {args.max_model_len}: "
          f"{len(res.windows)} overlapping windows, {len(res.rounds)} rounds, "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    for i, s in enumerate(res.rounds[0]):
        print(f"--- window {i}: {s}")
    print(f"=== summary:\n{res.summary}")


if __name__ == "__main__":
    main()
