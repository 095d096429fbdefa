"""minivllm: a compact, fast, vLLM-style LLM serving runtime (torch + Triton)."""

from minivllm.engine.async_llm import AsyncLLM, EngineDeadError
from minivllm.llm import LLM
from minivllm.outputs import CompletionOutput, RequestOutput
from minivllm.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "EngineDeadError", "SamplingParams", "RequestOutput",
           "CompletionOutput"]
__version__ = "0.1.0"
