"""``python -m minivllm.distributed``: one tensor-parallel worker rank on a host other than the
engine's, from torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). ``minivllm worker`` starts these for a whole host."""

from minivllm.distributed.worker_proc import run_from_env

run_from_env()
