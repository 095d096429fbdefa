"""minivllm: a compact, fast, vLLM-style LLM serving runtime (torch + Triton)."""

from typing import Any

from minivllm.llm import LLM
from minivllm.outputs import CompletionOutput, RequestOutput
from minivllm.pooling_params import PoolingParams
from minivllm.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "EngineDeadError", "SamplingParams", "RequestOutput",
           "CompletionOutput", "PoolingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # AsyncLLM pulls in pyzmq and multiprocessing machinery that offline use never needs.
    if name in ("AsyncLLM", "EngineDeadError"):
        from minivllm.engine import async_llm

        return getattr(async_llm, name)
    raise AttributeError(f"module 'minivllm' has no attribute {name!r}")
