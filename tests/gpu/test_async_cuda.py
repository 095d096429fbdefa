"""AsyncLLM on a GPU: the engine core process (spawned, CUDA graphs, Triton) streams the same
tokens as the in-process LLM. Skipped without CUDA."""

from __future__ import annotations

import asyncio

import pytest
import torch

from minivllm import LLM, AsyncLLM, SamplingParams
from tests.gpu.test_engine_cuda import QWEN3_06B, _compare, _prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_async_engine_on_gpu_matches_offline():
    prompts = _prompts(151936)
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=5, ignore_eos=True)
    llm = LLM(QWEN3_06B, load_format="dummy", seed=0, gpu_memory_utilization=0.4)
    expected = llm.generate(prompts, params, use_tqdm=False)
    del llm
    torch.cuda.empty_cache()

    async def main(engine):
        async def one(i, p):
            return [o async for o in engine.generate(p, params, f"gpu-{i}")]
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    with AsyncLLM(QWEN3_06B, load_format="dummy", seed=0, gpu_memory_utilization=0.4) as engine:
        streams = asyncio.run(main(engine))
    assert all(len(s) == 16 and s[-1].finished for s in streams)
    same, total = _compare(expected, [s[-1] for s in streams])
    print(f"AsyncLLM vs LLM on GPU: {same}/{total} greedy tokens identical")
    assert same >= 0.8 * total
