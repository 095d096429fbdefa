"""One model runner in the engine core's own process (tensor-parallel size 1)."""

from __future__ import annotations

from minivllm.config import EngineConfig
from minivllm.engine.scheduler_output import SchedulerOutput
from minivllm.executor.base import Executor, StepFuture
from minivllm.runner.model_runner import ModelRunner


class UniProcExecutor(Executor):
    """Calls the runner directly: ``execute`` enqueues the step and returns its handle."""

    def __init__(self, config: EngineConfig) -> None:
        self.runner = ModelRunner(
            model_dir=config.model_dir, arch=config.arch, device=config.device, dtype=config.dtype,
            load_format=config.load_format, seed=config.seed,
            attention_backend=config.attention_backend,
            quantization=config.quantization,
            max_position=config.scheduler.max_model_len,
            kv_cache_dtype=config.kv_cache_dtype, calculate_kv_scales=config.calculate_kv_scales)

    def num_available_kv_blocks(self, block_size: int, gpu_memory_utilization: float,
                                max_num_batched_tokens: int) -> int:
        return self.runner.auto_num_blocks(block_size, gpu_memory_utilization,
                                           max_num_batched_tokens)

    def initialize(self, num_blocks: int, block_size: int, max_num_seqs: int,
                   max_num_batched_tokens: int, max_model_len: int, enforce_eager: bool) -> None:
        runner = self.runner
        runner.allocate_kv_cache(num_blocks, block_size, max_num_seqs, max_model_len)
        runner.warm_up_prefill(max_num_batched_tokens, max_model_len)
        runner.warm_up_sampler(max_num_seqs)
        if not enforce_eager:
            runner.capture_decode_graphs(max_num_seqs, max_model_len)

    def execute(self, step: SchedulerOutput) -> StepFuture:
        return self.runner.execute(step)

    @property
    def attention_backend_name(self) -> str:
        return self.runner.backend.name
