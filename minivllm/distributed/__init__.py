"""Tensor parallelism on torch.distributed: the group object, rendezvous, sharding arithmetic
and the spawned worker processes that hold ranks 1..N-1."""

from minivllm.distributed.group import TensorParallelGroup
from minivllm.distributed.init import destroy_distributed, init_distributed
from minivllm.distributed.sharding import check_tensor_parallel, kv_cache_heads_per_rank, kv_heads_per_rank
from minivllm.distributed.worker_group import WorkerContext, WorkerError, WorkerGroup

__all__ = ["TensorParallelGroup", "WorkerContext", "WorkerError", "WorkerGroup",
           "check_tensor_parallel", "destroy_distributed", "init_distributed",
           "kv_cache_heads_per_rank", "kv_heads_per_rank"]
