"""The result of a launched step: sampled ids on their way to the host."""

from __future__ import annotations

import torch

from minivllm.engine.scheduler_output import ModelRunnerOutput
from minivllm.layers.sampler import SamplerOutput
from minivllm.runner.prompt_logprobs import PendingPromptLogprobs


class StepHandle:
    """A launched step's sampled tokens, copied to the host without blocking the launch."""

    def __init__(self, req_ids: list[str], out: SamplerOutput | None, num_logprobs: list[int],
                 device: torch.device, prompt_logprobs: PendingPromptLogprobs | None = None) -> None:
        self.req_ids = req_ids
        self.prompt_logprobs = prompt_logprobs
        self.num_logprobs = num_logprobs
        self._host: list[torch.Tensor | None] = []
        self._event = None
        if out is None:
            return
        tensors = (out.sampled_token_ids, out.sampled_logprobs, out.topk_token_ids,
                   out.topk_logprobs, out.sampled_ranks)
        if device.type == "cuda":
            self._host = [None if t is None else t.to("cpu", non_blocking=True) for t in tensors]
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = list(tensors)

    @classmethod
    def empty(cls, prompt_logprobs: PendingPromptLogprobs | None = None) -> "StepHandle":
        """A step that sampled nothing (it may still have scored prompt positions)."""
        return cls([], None, [], torch.device("cpu"), prompt_logprobs)

    def result(self) -> ModelRunnerOutput:
        """Wait for the step (the engine's one device→host sync) and return its tokens."""
        output = self._sampled()
        if self.prompt_logprobs is not None:
            output.prompt_logprobs = self.prompt_logprobs.result()
        return output

    def _sampled(self) -> ModelRunnerOutput:
        if not self.req_ids:
            return ModelRunnerOutput([], [], [], [])
        if self._event is not None:
            self._event.synchronize()
        ids_t, lp_t, top_ids_t, top_lp_t, rank_t = self._host
        token_ids = ids_t.tolist()
        n = len(token_ids)
        logprobs: list[dict[int, float] | None] = [None] * n
        sampled_lp: list[float | None] = [None] * n
        sampled_ranks: list[int | None] = [None] * n
        if lp_t is not None:
            sampled = lp_t.tolist()
            ranks = rank_t.tolist() if rank_t is not None else [None] * n
            top_ids = top_ids_t.tolist() if top_ids_t is not None else None
            top_lp = top_lp_t.tolist() if top_lp_t is not None else None
            for i, k in enumerate(self.num_logprobs):
                if k < 0:
                    continue
                sampled_lp[i] = sampled[i]
                sampled_ranks[i] = ranks[i]
                entry = dict(zip(top_ids[i][:k], top_lp[i][:k])) if k and top_ids else {}
                entry[token_ids[i]] = sampled[i]
                logprobs[i] = entry
        return ModelRunnerOutput(self.req_ids, token_ids, logprobs, sampled_lp, sampled_ranks)
