"""Frontend side of the outputs: detokenize, check stop strings, assemble RequestOutputs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from minivllm.engine.detokenizer import IncrementalDetokenizer
from minivllm.engine.input_processor import ProcessedPrompt, child_request_id
from minivllm.engine.messages import EngineCoreOutput
from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from minivllm.sampling_params import SamplingParams


@dataclass
class _SequenceState:
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
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
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class OutputProcessor:
    """Tracks every live request of a frontend and turns core outputs into RequestOutputs."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}
        self._child_to_parent: dict[str, tuple[str, int]] = {}

    def add_request(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                    arrival_time: float) -> None:
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
                                                RequestMetrics(arrival_time), seqs)

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the RequestOutputs of requests that finished this step, and the core ids
        that a stop string ended (the core must abort them)."""
        now = time.time()
        to_abort: list[str] = []
        touched: dict[str, _RequestState] = {}
        for out in outputs:
            parent = self._child_to_parent.get(out.request_id)
            if parent is None:
                continue  # already finished here (e.g. a stop string), core is catching up
            state = self.states[parent[0]]
            seq = state.seqs[parent[1]]
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            seq.token_ids.extend(out.new_token_ids)
            if seq.logprobs is not None and out.new_logprobs:
                seq.logprobs.extend(out.new_logprobs)
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
            touched[state.request_id] = state
        finished = []
        for state in touched.values():
            if state.finished:
                state.metrics.finished_time = now
                finished.append(self.make_output(state))
                del self.states[state.request_id]
        return finished, to_abort

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
        outs = [CompletionOutput(
            index=s.index, text=s.detok.text, token_ids=list(s.token_ids),
            finish_reason=s.finish_reason, stop_reason=s.stop_reason,
            logprobs=list(s.logprobs) if s.logprobs is not None else None,
            cumulative_logprob=s.cumulative_logprob) for s in state.seqs]
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt.prompt,
            prompt_token_ids=list(state.prompt.prompt_token_ids), outputs=outs,
            finished=state.finished, num_cached_tokens=state.num_cached_tokens,
            metrics=state.metrics)
