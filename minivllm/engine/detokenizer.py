"""Incremental detokenization with stop-string detection."""

from __future__ import annotations

try:  # tokenizers >= 0.21: incremental decoding in Rust, ~6x cheaper per token than windows
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - older tokenizers
    DecodeStream = None

# Prompt tokens kept as left context, so tokenizers that drop a leading space at the start
# of a decode (SentencePiece) still produce the right first word.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text without re-decoding everything each step.

    Text is emitted only once it is stable: a token that ends in an incomplete UTF-8 sequence
    waits for the next one. Fast (Rust) tokenizers use ``tokenizers``' DecodeStream; others
    decode a sliding window of ids and keep the part past its already-emitted prefix.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool,
                 stop_strings: list[str], include_stop_str_in_output: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop_strings = stop_strings
        self.include_stop = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in stop_strings), default=0)
        context = prompt_token_ids[-_CONTEXT_TOKENS:] if tokenizer is not None else []
        self.ids: list[int] = list(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.text = ""
        self.stopped = False  # a stop string matched: later tokens add nothing
        self._stream = None
        backend = getattr(tokenizer, "_tokenizer", None)
        if DecodeStream is not None and backend is not None:
            self._backend = backend
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            for token_id in context:  # prime with prompt context; its text is not output
                self._stream.step(backend, token_id)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, new_ids: list[int], check_stop: bool = True) -> str | None:
        """Append tokens; returns the stop string that matched (text truncated), else None."""
        if self.tokenizer is None or self.stopped:
            return None
        self.ids.extend(new_ids)
        if self._stream is not None:
            pieces = [self._stream.step(self._backend, t) for t in new_ids]
            new_text = "".join(p for p in pieces if p)
            if not new_text:
                return None
            old_len = len(self.text)
            self.text += new_text
            return self._find_stop(old_len) if check_stop else None
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return None
        old_len = len(self.text)
        self.text += full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return self._find_stop(old_len) if check_stop else None

    def _find_stop(self, old_len: int) -> str | None:
        if not self.stop_strings:
            return None
        # A stop string may straddle the previous text and the new piece.
        search_from = max(0, old_len - self.max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self.stop_strings:
            idx = self.text.find(stop, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        self.stopped = True
        self.text = self.text[: idx + len(stop)] if self.include_stop else self.text[:idx]
        return stop
