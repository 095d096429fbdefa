"""LLM(tensor_parallel_size=2) through the MultiprocExecutor: greedy ids equal TP=1 with
chunked prefill, prefix caching and preemption in the mix; a killed worker fails the engine."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from minivllm import LLM, AsyncLLM, EngineDeadError, SamplingParams
from minivllm.distributed import WorkerError
from tests.conftest import random_prompts
from tests.distributed.test_worker_group import _gone, _worker_children

def _prompts():
    shared = random_prompts([40], seed=11)[0]
    # Two prompts share a 32-token prefix (prefix cache hits); lengths straddle blocks and the
    # token budget (chunked prefill).
    return [shared + p for p in random_prompts([5, 9], seed=12)] + random_prompts([1, 17, 70], seed=13)


def _generate(model_dir: str, tp: int, params: SamplingParams | None = None, **kw) -> list[list[int]]:
    llm = LLM(model_dir, device="cpu", tensor_parallel_size=tp, block_size=16,
              max_num_batched_tokens=64, **kw)
    params = params or SamplingParams(temperature=0, max_tokens=12)
    try:
        outs = llm.generate(_prompts(), params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "kv1"])
def test_tp2_greedy_equals_tp1(kind, tiny_model_dirs, qwen3_kv1_dir):
    model_dir = qwen3_kv1_dir if kind == "kv1" else tiny_model_dirs[kind]
    # 12 blocks of 16 tokens cannot hold all six sequences at once: the scheduler preempts.
    assert _generate(model_dir, 2, num_kv_blocks=12) == _generate(model_dir, 1, num_kv_blocks=12)


def test_tp2_overlapped_seeded_sampling_equals_tp1(tiny_model_dirs):
    """Overlapped scheduling feeds each rank's own sampled ids back as inputs: every rank must
    sample the same tokens (same gathered logits, same generator), seeded sampling included."""
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=12)
    kw = dict(params=params, async_scheduling=True, num_kv_blocks=12)
    model_dir = tiny_model_dirs["qwen3"]
    assert _generate(model_dir, 2, **kw) == _generate(model_dir, 1, **kw)


def test_tp2_logit_bias_and_allowed_ids_equal_tp1(tiny_model_dirs):
    """Every rank applies the same bias and allowed-token mask (overlapped: each rank feeds its
    own sampled ids back), so TP=2 samples what TP=1 does, and only allowed tokens."""
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=10, logit_bias={3: 2.0, 4: -1.0},
                            allowed_token_ids=[1, 2, 3, 4, 5])
    kw = {"params": params, "async_scheduling": True, "num_kv_blocks": 12}
    model_dir = tiny_model_dirs["llama"]
    tp2 = _generate(model_dir, 2, **kw)
    assert tp2 == _generate(model_dir, 1, **kw)
    assert {t for ids in tp2 for t in ids} <= {1, 2, 3, 4, 5}


def test_killed_worker_fails_generate(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cpu", tensor_parallel_size=2, block_size=16)
    try:
        executor = llm.engine.executor
        os.kill(executor.workers.worker_pids[0], signal.SIGKILL)
        with pytest.raises(WorkerError, match="rank 1"):
            llm.generate(random_prompts([8]), SamplingParams(max_tokens=4), use_tqdm=False)
    finally:
        llm.engine.shutdown()


def test_async_llm_tp2_matches_and_dies_with_a_worker(tiny_model_dirs):
    """The engine core runs in its own (daemonic) process and starts rank 1 from there."""
    model_dir = tiny_model_dirs["qwen2"]
    prompt = random_prompts([9], seed=3)[0]
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = LLM(model_dir, device="cpu").generate([prompt], params, use_tqdm=False)

    async def main() -> list[int]:
        with AsyncLLM(model_dir, device="cpu", tensor_parallel_size=2) as engine:
            out = None
            async for out in engine.generate(prompt, params, request_id="a"):
                pass
            assert out.outputs[0].token_ids == expected[0].outputs[0].token_ids
            core_pid = engine.client.proc.pid
            workers = _worker_children(core_pid)
            assert len(workers) == 1
            os.kill(workers[0], signal.SIGKILL)
            with pytest.raises(EngineDeadError):
                async for _ in engine.generate(prompt, params, request_id="b"):
                    pass
        return [core_pid, *workers]

    pids = asyncio.run(main())
    deadline = time.monotonic() + 20
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids)
