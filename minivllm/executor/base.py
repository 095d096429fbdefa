"""The seam between the engine core and the model runner(s).

The core hands an executor plain data (``SchedulerOutput``) and gets back a handle whose
``result()`` waits for the sampled tokens. One in-process runner (``UniProcExecutor``) and N
tensor-parallel workers share this interface; the core never touches a runner directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from minivllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput


class StepFuture(Protocol):
    def result(self) -> ModelRunnerOutput:
        """Block until the step has run; its sampled tokens."""


class Executor(ABC):
    """Runs engine steps on the model; owns the KV cache(s)."""

    @abstractmethod
    def num_available_kv_blocks(self, block_size: int, gpu_memory_utilization: float,
                                max_num_batched_tokens: int) -> int:
        """KV blocks that fit on every worker (the minimum over them)."""

    @abstractmethod
    def initialize(self, num_blocks: int, block_size: int, max_num_seqs: int,
                   max_num_batched_tokens: int, max_model_len: int, enforce_eager: bool) -> None:
        """Allocate the KV cache and the persistent batch; warm up and capture graphs."""

    @abstractmethod
    def execute(self, step: SchedulerOutput) -> StepFuture:
        """Launch one step; returns without waiting for the device."""

    def shutdown(self) -> None:
        """Release workers (nothing to do in-process)."""

    @property
    @abstractmethod
    def attention_backend_name(self) -> str:
        """Name of the attention backend the workers run."""
