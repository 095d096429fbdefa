"""N tensor-parallel model runners: rank 0 in the engine core's process, ranks 1..N-1 spawned
(or, across hosts, started there by ``minivllm worker``: ``NNODES``/``MASTER_ADDR``/``MASTER_PORT``
in the environment, see :mod:`minivllm.distributed.nodes`).

Every step is sent, unchanged (``SchedulerOutput`` is plain data), to every rank through the
:class:`~minivllm.distributed.WorkerGroup` control channel; each rank runs its model shard over
its share of the KV cache, the collectives inside the model keep them in step, and rank 0's
sampled tokens are the step's result. Every rank samples from the same all-gathered logits with
an identically seeded generator, so their persistent batches (which feed sampled ids back as
next inputs on the device) stay identical without another collective.

A worker that raises or dies fails the step with a :class:`~minivllm.distributed.WorkerError`
(and every later one: the group cannot recover); ``shutdown()`` stops the processes.
"""

from __future__ import annotations

import os

from minivllm.config import EngineConfig
from minivllm.distributed.nodes import NodeLayout
from minivllm.distributed.sharding import check_tensor_parallel
from minivllm.distributed.worker_group import WorkerGroup
from minivllm.distributed.worker_proc import WorkerContext
from minivllm.engine.scheduler_output import SchedulerOutput
from minivllm.executor.base import Executor, StepFuture
from minivllm.runner.model_runner import ModelRunner


# ---- commands run on every rank (module level: workers import them by name) -----------------
def _build_runner(ctx: WorkerContext, config: EngineConfig) -> str:
    runner = ModelRunner(
        model_dir=config.model_dir, arch=config.arch, device=ctx.device, dtype=config.dtype,
        load_format=config.load_format, seed=config.seed,
        attention_backend=config.attention_backend,
        max_position=config.scheduler.max_model_len, tp_group=ctx.tp_group,
        quantization=config.quantization, kv_cache_dtype=config.kv_cache_dtype,
        calculate_kv_scales=config.calculate_kv_scales)
    ctx.state["runner"] = runner
    return runner.backend.name


def _num_available_kv_blocks(ctx: WorkerContext, block_size: int, gpu_memory_utilization: float,
                             max_num_batched_tokens: int) -> int:
    return ctx.state["runner"].auto_num_blocks(block_size, gpu_memory_utilization,
                                               max_num_batched_tokens)


def _initialize(ctx: WorkerContext, num_blocks: int, block_size: int, max_num_seqs: int,
                max_num_batched_tokens: int, max_model_len: int, enforce_eager: bool) -> None:
    runner = ctx.state["runner"]
    runner.allocate_kv_cache(num_blocks, block_size, max_num_seqs, max_model_len)
    runner.warm_up_prefill(max_num_batched_tokens, max_model_len)
    runner.warm_up_sampler(max_num_seqs)
    if not enforce_eager:
        runner.capture_decode_graphs(max_num_seqs, max_model_len)


def _execute(ctx: WorkerContext, step: SchedulerOutput):
    handle = ctx.state["runner"].execute(step)
    # Rank 0 keeps its handle (its tokens are the result); the others send back nothing.
    return handle if ctx.rank == 0 else None


class MultiprocExecutor(Executor):
    """Tensor parallelism over ``config.tensor_parallel_size`` ranks, on this host or split
    evenly over ``nodes`` (default: from the environment, :meth:`NodeLayout.from_env`).

    Raises (from the constructor):
        ValueError: the model does not split over that many ranks.
        WorkerError: a worker failed to start or to build its runner.
    """

    def __init__(self, config: EngineConfig, *, worker_num_threads: int | None = None,
                 nodes: NodeLayout | None = None) -> None:
        tp_size = config.tensor_parallel_size
        check_tensor_parallel(config.arch, tp_size)
        nodes = nodes or NodeLayout.from_env()
        local_size = tp_size if nodes is None else nodes.ranks_per_node(tp_size)
        if config.device.type == "cuda":
            import torch

            if torch.cuda.device_count() < local_size:
                raise ValueError(f"tensor_parallel_size {tp_size} needs {local_size} CUDA devices "
                                 f"on this host, {torch.cuda.device_count()} visible")
        if worker_num_threads is None and config.device.type == "cpu":
            # CPU ranks share the host's cores: do not let each of them claim all of them.
            worker_num_threads = max(1, (os.cpu_count() or 1) // local_size)
        # Other hosts may be started after this one: give them time to join.
        startup_timeout_s = 60.0 if nodes is None else 600.0
        self.workers = WorkerGroup(tp_size, device_type=config.device.type,
                                   worker_num_threads=worker_num_threads, nodes=nodes,
                                   startup_timeout_s=startup_timeout_s)
        self.workers.start()
        try:
            backends = self.workers.execute(_build_runner, config)
        except BaseException:
            self.workers.shutdown()
            raise
        self._backend_name = backends[0]

    def num_available_kv_blocks(self, block_size: int, gpu_memory_utilization: float,
                                max_num_batched_tokens: int) -> int:
        return min(self.workers.execute(_num_available_kv_blocks, block_size,
                                        gpu_memory_utilization, max_num_batched_tokens))

    def initialize(self, num_blocks: int, block_size: int, max_num_seqs: int,
                   max_num_batched_tokens: int, max_model_len: int, enforce_eager: bool) -> None:
        self.workers.execute(_initialize, num_blocks, block_size, max_num_seqs,
                             max_num_batched_tokens, max_model_len, enforce_eager)

    def execute(self, step: SchedulerOutput) -> StepFuture:
        return self.workers.execute(_execute, step)[0]

    def shutdown(self) -> None:
        self.workers.shutdown()

    @property
    def attention_backend_name(self) -> str:
        return self._backend_name
