"""Frontend side of the outputs: detokenize, check stop strings, assemble RequestOutputs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from minivllm.engine.detokenizer import IncrementalDetokenizer
from minivllm.engine.input_processor import ProcessedPrompt, child_request_id
from minivllm.engine.messages import EngineCoreOutput
from minivllm.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
)
from minivllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

OUTPUT_KINDS = ("cumulative", "delta", "final")


@dataclass
class _SequenceState:
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    num_sent_tokens: int = 0  # for delta outputs: what earlier outputs already carried
    num_sent_chars: int = 0
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _RequestState:
    request_id: str
    prompt: ProcessedPrompt
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[_SequenceState]
    output_kind: str = "final"
    num_cached_tokens: int = 0
    error: str | None = None  # set when the request failed: its message for the caller
    # With ``params.prompt_logprobs``: set from the first core output that carries them (with
    # n > 1 every sequence computes them; the first to arrive wins). Delta outputs carry them once.
    prompt_logprobs: PromptLogprobs | None = None
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class OutputProcessor:
    """Tracks every live request of a frontend and turns core outputs into RequestOutputs."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}
        self._child_to_parent: dict[str, tuple[str, int]] = {}
        # Token id → its text in logprobs: a top-20 request decodes 21 ids per token, mostly
        # the same few; bounded by the vocabulary size.
        self._token_text: dict[int, str] = {}

    def add_request(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                    arrival_time: float, output_kind: str = "final") -> None:
        """Track a request. ``output_kind``: ``final`` (one output when done), ``cumulative``
        (every step, everything so far) or ``delta`` (every step, only what is new)."""
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
        if request_id in self.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        seqs = []
        for i in range(params.n):
            detok = IncrementalDetokenizer(self.tokenizer, prompt.prompt_token_ids,
                                           params.skip_special_tokens, params.stop_strings,
                                           params.include_stop_str_in_output)
            seq = _SequenceState(i, detok)
            if params.logprobs is not None:
                seq.logprobs, seq.cumulative_logprob = [], 0.0
            seqs.append(seq)
            self._child_to_parent[child_request_id(request_id, i)] = (request_id, i)
        self.states[request_id] = _RequestState(request_id, prompt, params,
                                                RequestMetrics(arrival_time), seqs, output_kind)

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns this step's RequestOutputs (finished requests, plus unfinished streaming
        ones), and the core ids that the frontend ended (a stop string, or a sibling of a
        failed sequence): the core must abort them.

        An output with ``finish_reason="error"`` fails its whole request (every completion
        still running ends with ``"error"``; ``RequestOutput.error`` holds the message). So
        does an exception while detokenizing one request's tokens; other requests go on.
        """
        now = time.time()
        to_abort: list[str] = []
        touched: dict[str, _RequestState] = {}
        for out in outputs:
            parent = self._child_to_parent.get(out.request_id)
            if parent is None:
                continue  # already finished here (e.g. a stop string), core is catching up
            state = self.states[parent[0]]
            touched[state.request_id] = state
            if out.finish_reason == "error" or out.error is not None:
                self._fail(state, out.error or "the request failed in the engine", to_abort,
                           failed_child=out.request_id)
                continue
            try:
                self._add_output(state, state.seqs[parent[1]], out, now, to_abort)
            except Exception as e:  # e.g. the tokenizer cannot decode an id: this request only
                logger.exception("processing the output of request %s failed", state.request_id)
                self._fail(state, f"decoding the output failed ({type(e).__name__})", to_abort)
        results = []
        for state in touched.values():
            if state.finished:
                state.metrics.finished_time = now
                results.append(self.make_output(state))
                del self.states[state.request_id]
            elif state.output_kind != "final":
                results.append(self.make_output(state))
        return results, to_abort

    def _add_output(self, state: _RequestState, seq: _SequenceState, out: EngineCoreOutput,
                    now: float, to_abort: list[str]) -> None:
        state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = now
        if out.prompt_logprobs is not None and state.prompt_logprobs is None:
            state.prompt_logprobs = self._prompt_logprobs(state.prompt.prompt_token_ids, out)
        seq.token_ids.extend(out.new_token_ids)
        if seq.logprobs is not None and out.new_logprobs:
            ranks = out.new_sampled_ranks or [None] * len(out.new_logprobs)
            for tid, step, rank in zip(out.new_token_ids, out.new_logprobs, ranks):
                seq.logprobs.append(self._logprobs(step, tid, rank))
            seq.cumulative_logprob += sum(out.new_sampled_logprobs or [])
        past_min = len(seq.token_ids) >= state.params.min_tokens
        stop = seq.detok.add_tokens(out.new_token_ids, check_stop=past_min)
        if stop is not None and out.finish_reason is None:
            seq.finish_reason, seq.stop_reason = "stop", stop
            to_abort.append(out.request_id)
        elif out.finish_reason is not None:
            seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
            if stop is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
        if seq.finish_reason is not None:
            self._child_to_parent.pop(out.request_id, None)

    def _logprobs(self, step: dict[int, float], sampled_id: int,
                  sampled_rank: int | None) -> dict[int, Logprob]:
        """One step's ``{token id: logprob}`` from the core → ``{token id: Logprob}``.

        The core lists the top-N tokens most likely first, then the sampled token when it is
        not among them; the sampled token's rank comes from the core (it may be beyond N).
        """
        entry = {}
        for position, (tid, lp) in enumerate(step.items()):
            rank = sampled_rank if tid == sampled_id else position + 1
            entry[tid] = Logprob(lp, rank, self._decode_token(tid))
        return entry

    def _prompt_logprobs(self, prompt_ids: list[int], out: EngineCoreOutput) -> PromptLogprobs:
        """vLLM's shape: None for the first prompt token (nothing predicts it), then per
        token ``{token id: Logprob}`` with the top-N and the prompt token itself."""
        ranks = out.prompt_logprob_ranks or [None] * len(out.prompt_logprobs)
        result: PromptLogprobs = [None]
        for p, (step, rank) in enumerate(zip(out.prompt_logprobs, ranks)):
            result.append(self._logprobs(step, prompt_ids[p + 1], rank))
        return result

    def _decode_token(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def _fail(self, state: _RequestState, message: str, to_abort: list[str],
              failed_child: str | None = None) -> None:
        """End every sequence of ``state`` with ``error``; the core must drop the others."""
        state.error = message
        for seq in state.seqs:
            child = child_request_id(state.request_id, seq.index)
            if seq.finish_reason is None:
                seq.finish_reason, seq.stop_reason = "error", None
                if child != failed_child:
                    to_abort.append(child)
            self._child_to_parent.pop(child, None)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish every unfinished sequence of ``request_id`` with ``abort``."""
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
            self._child_to_parent.pop(child_request_id(request_id, seq.index), None)
        state.metrics.finished_time = time.time()
        return self.make_output(state)

    def make_output(self, state: _RequestState) -> RequestOutput:
        finished = state.finished
        delta = state.output_kind == "delta"
        outs = []
        for s in state.seqs:
            text = s.detok.text
            if s.finish_reason is None and s.detok.max_stop_len > 1:
                # A stop string may be forming at the end: hold those characters back.
                text = text[:max(len(text) - (s.detok.max_stop_len - 1), 0)]
            text = text[max(min(s.num_sent_chars, len(text)), 0):] if delta else text
            token_ids = s.token_ids[s.num_sent_tokens:] if delta else list(s.token_ids)
            logprobs = None
            if s.logprobs is not None:
                logprobs = s.logprobs[s.num_sent_tokens:] if delta else list(s.logprobs)
            if delta:
                s.num_sent_chars += len(text)
                s.num_sent_tokens = len(s.token_ids)
            outs.append(CompletionOutput(
                index=s.index, text=text, token_ids=token_ids, finish_reason=s.finish_reason,
                stop_reason=s.stop_reason, logprobs=logprobs, cumulative_logprob=s.cumulative_logprob))
        prompt_logprobs = state.prompt_logprobs
        if delta and prompt_logprobs is not None:
            prompt_logprobs = None if state.prompt_logprobs_sent else prompt_logprobs
            state.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt.prompt,
            # Shared, not copied: a streaming request makes an output per token, and copying a
            # long prompt each time was a third of this method's cost.
            prompt_token_ids=state.prompt.prompt_token_ids, outputs=outs,
            finished=finished, num_cached_tokens=state.num_cached_tokens,
            metrics=state.metrics, error=state.error, prompt_logprobs=prompt_logprobs)

    def has_request(self, request_id: str) -> bool:
        return request_id in self.states

    def fail_all(self) -> list[str]:
        """Forget every live request (the engine died); returns their ids."""
        ids = list(self.states)
        self.states.clear()
        self._child_to_parent.clear()
        return ids
