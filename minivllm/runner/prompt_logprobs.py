"""Prompt logprobs: how likely the model found each prompt token, scored over prefill chunks.

Position ``p`` of a prompt is scored by prompt token ``p + 1`` (the logits at ``p`` predict the
next token), so a chunk ``[start, start + n)`` scores positions ``start .. min(start + n, P - 1)``;
the last position of a chunk that is not the prompt's last needs the first token of the next
chunk, which is why the prompt itself is kept here. Position ``P - 1`` predicts the first output
token: that one is the sampler's.

Nothing here runs unless a request in the batch asked (``active``): no extra kernels or host
syncs otherwise. When one did, its prompt positions go through the LM head in float32 slices
of ``ROWS_PER_PASS`` (a full prefill chunk at once would need ``tokens x vocab`` floats), and
the small results travel to the host like the sampled ids: asynchronously, awaited in
``result()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from minivllm.engine.scheduler_output import PromptLogprobsChunk, SchedulerOutput
from minivllm.runner.staging import to_device

# Prompt positions sent through the LM head at once: bounds the float32 [rows, vocab] temporaries
# (256 x 152k vocabulary x 4 bytes = 150 MiB each).
ROWS_PER_PASS = 256


@dataclass
class _Segment:
    request_id: str
    start: int  # first prompt position scored
    count: int  # positions scored
    num_top: int  # the request's prompt_logprobs (top-N)
    targets: list[int]  # the prompt tokens scoring positions start .. start + count - 1


class PromptLogprobsRows:
    """The running requests that want prompt logprobs: their N and prompt token ids."""

    def __init__(self) -> None:
        self._wanted: dict[str, tuple[int, list[int]]] = {}

    @property
    def active(self) -> bool:
        """Whether any request in the persistent batch wants prompt logprobs."""
        return bool(self._wanted)

    def update(self, step: SchedulerOutput) -> None:
        """Follow the persistent batch: drop finished / preempted rows, take new ones."""
        if self._wanted:
            for rid in step.finished_req_ids:
                self._wanted.pop(rid, None)
        for new in step.new_requests:
            n = new.params.prompt_logprobs
            if n is not None and new.pooling_params is None:
                self._wanted[new.request_id] = (n, new.prompt_token_ids)

    def compute(self, step: SchedulerOutput, hidden: torch.Tensor,
                compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> PendingPromptLogprobs | None:
        """Launch the scoring of this step's prompt positions of the wanting rows (``hidden``:
        the step's final hidden states, rows in ``step`` order). None when there are none."""
        segments: list[_Segment] = []
        rows: list[int] = []
        targets: list[int] = []
        offset = 0
        for i, rid in enumerate(step.req_ids):
            n = step.num_scheduled_tokens[i]
            want = self._wanted.get(rid)
            if want is not None:
                num_top, prompt = want
                start = step.num_computed_tokens[i]
                end = min(start + n, len(prompt) - 1)
                if end > start:
                    segments.append(_Segment(rid, start, end - start, num_top,
                                             prompt[start + 1:end + 1]))
                    rows.extend(range(offset, offset + end - start))
                    targets.extend(segments[-1].targets)
            offset += n
        if not segments:
            return None
        dev = hidden.device
        rows_t = to_device(rows, torch.int64, dev)
        targets_t = to_device(targets, torch.int64, dev)
        max_top = max(s.num_top for s in segments)
        target_lps, ranks, top_lps, top_ids = [], [], [], []
        for lo in range(0, len(rows), ROWS_PER_PASS):
            hi = min(lo + ROWS_PER_PASS, len(rows))
            logprobs = compute_logits(hidden.index_select(0, rows_t[lo:hi])).float().log_softmax(dim=-1)
            tgt = targets_t[lo:hi, None]
            target_lp = logprobs.gather(-1, tgt)
            target_lps.append(target_lp.squeeze(-1))
            # Tokens at least as likely as the prompt token, itself included (the sampler's rank).
            ranks.append((logprobs >= target_lp).sum(dim=-1))
            if max_top > 0:
                lp, ids = logprobs.topk(max_top, dim=-1)
                top_lps.append(lp)
                top_ids.append(ids)
        tensors = [torch.cat(target_lps), torch.cat(ranks)]
        if max_top > 0:
            tensors += [torch.cat(top_lps), torch.cat(top_ids)]
        return PendingPromptLogprobs(segments, tensors)


class PendingPromptLogprobs:
    """One step's prompt logprobs on their way to the host."""

    def __init__(self, segments: list[_Segment], tensors: list[torch.Tensor]) -> None:
        self._segments = segments
        self._event = None
        if tensors[0].device.type == "cuda":
            self._host = [t.to("cpu", non_blocking=True) for t in tensors]
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensors

    def result(self) -> dict[str, PromptLogprobsChunk]:
        """Wait for the copies; request id → its chunk of prompt logprobs."""
        if self._event is not None:
            self._event.synchronize()
        target_lps = self._host[0].tolist()
        ranks = self._host[1].tolist()
        top_lps = self._host[2].tolist() if len(self._host) > 2 else None
        top_ids = self._host[3].tolist() if len(self._host) > 2 else None
        prompts = {}
        targets_at = 0
        for seg in self._segments:
            entries = []
            for j in range(targets_at, targets_at + seg.count):
                # Most likely first, then the prompt token (if not among them): what the
                # output processor expects of sampled-token logprobs too.
                entry = (dict(zip(top_ids[j][:seg.num_top], top_lps[j][:seg.num_top]))
                         if seg.num_top else {})
                entry[seg.targets[j - targets_at]] = target_lps[j]
                entries.append(entry)
            prompts[seg.request_id] = PromptLogprobsChunk(
                seg.start, entries, ranks[targets_at:targets_at + seg.count])
            targets_at += seg.count
        return prompts
