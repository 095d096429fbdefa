"""The runner's side of pooling: per-request state across prefill chunks, and each step's pooled
outputs (the model's head applied, then softmax / sigmoid or L2 normalisation).

A pooling request's prompt may be prefilled over several steps (chunked prefill). Last-token
pooling only needs the final chunk; mean pooling keeps a float32 running sum of the hidden
states of every chunk. The state lives with the request's row: a preempted request is dropped
(``finished_req_ids``) and recomputed from scratch when it is re-added, so its sum restarts too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minivllm.attention.metadata import AttentionMetadata
from minivllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from minivllm.pooling_params import PoolingParams
from minivllm.runner.staging import to_device


class Pooler:
    """Pooling state of the runner's live pooling requests (none for generative models)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # Classifiers carry HF's ``score`` projection; their outputs are class scores.
        self.is_classifier = hasattr(model, "score")
        self.params: dict[str, PoolingParams] = {}
        self._sums: dict[str, torch.Tensor] = {}  # mean pooling: float32 [hidden] so far
        self._counts: dict[str, int] = {}
        self._num_mean = 0

    @property
    def active(self) -> bool:
        return bool(self.params)

    def update(self, step: SchedulerOutput) -> None:
        """Drop the rows that left the batch, then track the new pooling rows (a request
        resumed after a preemption appears in both: it starts over)."""
        if self.params:
            for rid in step.finished_req_ids:
                self._drop(rid)
        for new in step.new_requests:
            if new.pooling_params is not None:
                self._drop(new.request_id)
                self.params[new.request_id] = new.pooling_params
                self._num_mean += new.pooling_params.pooling_type == "mean"

    def _drop(self, rid: str) -> None:
        params = self.params.pop(rid, None)
        if params is not None:
            self._num_mean -= params.pooling_type == "mean"
            self._sums.pop(rid, None)
            self._counts.pop(rid, None)

    def pool(self, step: SchedulerOutput, meta: AttentionMetadata,
             hidden: torch.Tensor) -> PooledOutputs | None:
        """Accumulate this step's chunks of mean-pooled requests; pool the requests whose prompt
        ends in this step. Returns their outputs (still on the device), or None."""
        qsl = meta.query_start_loc_cpu.numpy()
        if self._num_mean:
            for i, rid in enumerate(step.req_ids):
                params = self.params.get(rid)
                if params is None or params.pooling_type != "mean":
                    continue
                start, end = int(qsl[i]), int(qsl[i + 1])
                chunk = hidden[start:end].sum(dim=0, dtype=torch.float32)
                prev = self._sums.get(rid)
                self._sums[rid] = chunk if prev is None else prev + chunk
                self._counts[rid] = self._counts.get(rid, 0) + end - start
        rows = step.pooling_rows
        if not rows:
            return None
        rids = [step.req_ids[i] for i in rows]
        params = [self.params[rid] for rid in rids]
        # Pinned and non-blocking on CUDA: a pageable copy would wait for the forward pass to
        # end and stall the host (and with it overlapped scheduling).
        last = to_device(qsl[1:][np.asarray(rows, dtype=np.int64)].astype(np.int64) - 1,
                         torch.int64, hidden.device)
        pooled = hidden[last].float()
        for j, (rid, p) in enumerate(zip(rids, params)):
            if p.pooling_type == "mean":
                pooled[j] = self._sums[rid] / self._counts[rid]
        out = self.model.pooler_head(pooled.to(hidden.dtype))
        return PooledOutputs(rids, self._finish(out, params))

    def _finish(self, out: torch.Tensor, params: list[PoolingParams]) -> torch.Tensor:
        """Softmax (sigmoid for one label) for classifiers, L2 normalisation for embeddings,
        on the rows that ask for it."""
        wanted = [p.activation if self.is_classifier else p.normalize for p in params]
        if not any(wanted):
            return out
        if self.is_classifier:
            done = torch.sigmoid(out) if out.shape[-1] == 1 else torch.softmax(out, dim=-1)
        else:
            done = F.normalize(out, p=2.0, dim=-1)
        if all(wanted):
            return done
        mask = to_device(wanted, torch.bool, out.device).unsqueeze(-1)
        return torch.where(mask, done, out)


class PooledOutputs:
    """One step's pooled outputs on their way to the host (non-blocking on CUDA)."""

    def __init__(self, req_ids: list[str], values: torch.Tensor) -> None:
        self.req_ids = req_ids
        self._event = None
        if values.device.type == "cuda":
            self._host = values.to("cpu", non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values

    def attach(self, handle):
        """Wrap a step handle so that its ``result()`` carries these outputs too."""
        return _PooledStepHandle(handle, self)

    def fill(self, output: ModelRunnerOutput) -> ModelRunnerOutput:
        if self._event is not None:
            self._event.synchronize()
        output.pooled_req_ids = self.req_ids
        output.pooled = self._host.tolist()
        return output


class _PooledStepHandle:
    """A step handle whose result also holds the step's pooled outputs."""

    def __init__(self, inner, pooled: PooledOutputs) -> None:
        self._inner = inner
        self._pooled = pooled

    def result(self) -> ModelRunnerOutput:
        return self._pooled.fill(self._inner.result())
