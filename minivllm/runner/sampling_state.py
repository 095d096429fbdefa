"""Per-request sampling state kept by the runner (seeded generators) and the per-step
``SamplingMetadata`` built from it."""

from __future__ import annotations

import torch

from minivllm.engine.request import Request
from minivllm.layers.sampler import SamplingMetadata


class SamplingState:
    """Owns one ``torch.Generator`` per seeded request, created on first use."""

    def __init__(self, device: torch.device, vocab_size: int) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.generators: dict[str, torch.Generator] = {}

    def remove(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def _generator(self, req: Request) -> torch.Generator | None:
        if req.seed is None:
            return None
        gen = self.generators.get(req.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(req.seed)
            self.generators[req.request_id] = gen
        return gen

    def build(self, reqs: list[Request]) -> SamplingMetadata:
        params = [r.params for r in reqs]
        dev = self.device

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        sampling_rows = [p.temperature > 0 for p in params]
        all_greedy = not any(sampling_rows)
        md = SamplingMetadata(
            # All-greedy steps (the common benchmark case) need none of these on the device.
            temperature=None if all_greedy else tensor([p.temperature for p in params], torch.float32),
            top_k=None if all_greedy else tensor([p.top_k for p in params], torch.int64),
            top_p=None if all_greedy else tensor([p.top_p for p in params], torch.float32),
            min_p=None if all_greedy else tensor([p.min_p for p in params], torch.float32),
            all_greedy=all_greedy,
            any_top_k=any(p.top_k > 0 for p, s in zip(params, sampling_rows) if s),
            any_top_p=any(p.top_p < 1 for p, s in zip(params, sampling_rows) if s),
            any_min_p=any(p.min_p > 0 for p, s in zip(params, sampling_rows) if s),
            generators=[self._generator(r) for r in reqs],
            max_num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
        )
        if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
            self._add_penalties(md, reqs)
        banned = [(i, self._banned_ids(r)) for i, r in enumerate(reqs)
                  if r.num_output_tokens < r.params.min_tokens]
        banned = [(i, ids) for i, ids in banned if ids]
        if banned:
            mask = torch.zeros(len(reqs), self.vocab_size, dtype=torch.bool)
            for i, ids in banned:
                mask[i, ids] = True
            md.banned_mask = mask.to(dev, non_blocking=True)
        return md

    def _banned_ids(self, req: Request) -> list[int]:
        """Tokens that would end the request before ``min_tokens`` have been generated."""
        ids = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            ids |= set(req.eos_token_ids)
        return [i for i in ids if 0 <= i < self.vocab_size]

    def _add_penalties(self, md: SamplingMetadata, reqs: list[Request]) -> None:
        """Prompt-occurrence mask and output counts, built on the device from the token ids:
        only ``[B, longest]`` ids cross to the device, never a ``[B, vocab]`` table."""
        b, v, dev = len(reqs), self.vocab_size, self.device

        def occurrences(seqs: list[list[int]]) -> torch.Tensor:
            longest = max((len(x) for x in seqs), default=0)
            # Padding points at an extra column that is dropped afterwards.
            ids = torch.full((b, max(longest, 1)), v, dtype=torch.int64)
            for i, x in enumerate(seqs):
                if x:
                    ids[i, :len(x)] = torch.tensor(x, dtype=torch.int64)
            counts = torch.zeros(b, v + 1, dtype=torch.float32, device=dev)
            ids = ids.to(dev, non_blocking=True)
            counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=dev))
            return counts[:, :v]

        md.prompt_mask = occurrences([r.prompt_token_ids for r in reqs]) > 0
        md.output_counts = occurrences([r.output_token_ids for r in reqs])
        md.repetition_penalty = torch.tensor([r.params.repetition_penalty for r in reqs]).to(dev)
        md.presence_penalty = torch.tensor([r.params.presence_penalty for r in reqs]).to(dev)
        md.frequency_penalty = torch.tensor([r.params.frequency_penalty for r in reqs]).to(dev)
