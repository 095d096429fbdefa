"""Nothing a client sends can take the engine down (issue 8), engine side, through AsyncLLM and
LLM: each test reproduces a case and then proves that the engine still serves.

Liveness bounds only (generous, for a loaded 2-core CI machine); no timing thresholds.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time

import pytest

from minivllm import LLM, AsyncLLM, SamplingParams
from minivllm.engine.async_llm import (
    EngineDeadError,
    EngineHungError,
    RequestFailedError,
)
from minivllm.engine.messages import EngineCoreOutput, EngineCoreOutputs
from minivllm.engine.serialization import outputs_to_wire
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
HEARTBEAT_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def engine(tiny_model_dirs):
    eng = AsyncLLM(tiny_model_dirs["qwen3"], device="cpu", heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def llm(tiny_model_dirs):
    return LLM(tiny_model_dirs["qwen3"], device="cpu")


@pytest.fixture(scope="module")
def prompt():
    return random_prompts([12], seed=81)[0]


@pytest.fixture(scope="module")
def expected(llm, prompt):
    return llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


async def _collect(engine, prompt, params, rid):
    return [out async for out in engine.generate(prompt, params, rid)]


async def _until(predicate, timeout_s: float = 30.0, what: str = "condition"):
    """Poll ``predicate`` (async) until true; a liveness bound, not a timing check."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


async def _idle(engine) -> bool:
    stats = await engine.stats()
    return stats["num_running"] == 0 and stats["num_waiting"] == 0


def _serves(engine, prompt, expected, rid: str) -> None:
    outs = asyncio.run(_collect(engine, prompt, GREEDY, rid))
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == expected


# ---- values out of range ---------------------------------------------------------------------
KILLERS = [  # (field, value): each passed validation once and failed inside an engine step
    ("top_k", 2**63), ("seed", 2**64), ("stop_token_ids", [2**63]), ("max_tokens", 2**63),
    ("min_tokens", 2**63), ("n", 20000), ("temperature", float("nan")), ("top_p", 1e-300),
]


@pytest.mark.parametrize("field,value", KILLERS, ids=[k for k, _ in KILLERS])
def test_out_of_range_value_is_a_value_error_and_both_engines_still_serve(
        field, value, engine, llm, prompt, expected):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value, "max_tokens": None} if field == "min_tokens" else {field: value})
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected
    _serves(engine, prompt, expected, f"after-{field}")


def _bypassing(**changes) -> SamplingParams:
    """Params changed after validation (they are a plain dataclass): what a buggy or hostile
    caller can still hand the engine."""
    params = SamplingParams(temperature=0.8, max_tokens=8)
    for k, v in changes.items():
        setattr(params, k, v)
    return params


BYPASSING = [("top_k", 2**63), ("stop_token_ids", [2**63]), ("max_tokens", 2**63),
             ("temperature", float("nan")), ("seed", 2**64), ("stop", ["\ud800"])]


def test_values_that_bypassed_validation_fail_alone_in_the_core(engine, prompt, expected):
    async def main():
        bystander = asyncio.create_task(_collect(engine, prompt, GREEDY, "bystander-core"))
        for field, value in BYPASSING:
            with pytest.raises(ValueError, match=f"{field}|cannot be sent"):
                await _collect(engine, prompt, _bypassing(**{field: value}), f"bypass-{field}")
        return await bystander

    outs = asyncio.run(main())
    assert outs[-1].outputs[0].token_ids == expected
    assert asyncio.run(_idle(engine))
    _serves(engine, prompt, expected, "after-bypass")


def test_llm_bypassed_values_do_not_reach_a_crash(llm, prompt, expected):
    """Values changed after validation are clamped where the runner stores them."""
    outs = llm.generate([prompt, prompt], [_bypassing(top_k=2**63, seed=2**64), GREEDY],
                        use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "length"
    assert outs[1].outputs[0].token_ids == expected


def test_failed_step_fails_its_requests_and_the_engine_goes_on(llm, prompt, expected, monkeypatch):
    """A step that raises (not a device error) fails the requests it ran, with a message and no
    traceback; their blocks are freed; later requests are served as before."""
    executor = llm.engine.executor
    real_execute = executor.execute
    failed_once = []

    def execute(step):
        if "poison" in str(step.req_ids) and not failed_once:
            failed_once.append(True)
            raise RuntimeError("injected failure")
        return real_execute(step)

    monkeypatch.setattr(executor, "execute", execute)
    outs = llm.generate([prompt], GREEDY, use_tqdm=False)  # warm: a step without the poison
    assert outs[0].outputs[0].token_ids == expected
    monkeypatch.setattr(llm, "_ids", iter(["poison", "next"]))  # ids of the next two prompts
    outs = llm.generate([prompt], GREEDY, use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error"
    assert "injected failure" in outs[0].error and "Traceback" not in outs[0].error
    kv = llm.engine.block_manager
    assert kv.num_free_blocks == kv.num_blocks and not llm.engine.has_unfinished
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected


def test_bad_text_and_request_ids_are_value_errors(engine, prompt, expected):
    async def main():
        with pytest.raises(ValueError, match="request_id"):
            await _collect(engine, prompt, GREEDY, 12345)
        with pytest.raises(ValueError, match="tokenizer|surrogate"):
            await _collect(engine, "lone \ud800 surrogate", GREEDY, "surrogate")

    asyncio.run(main())
    _serves(engine, prompt, expected, "after-bad-text")


# ---- a request the engine fails alone ------------------------------------------------------
def test_error_output_fails_one_stream_and_the_others_go_on(engine, prompt, expected):
    """What the core sends when a step fails for some requests only (finish_reason "error")."""
    async def main():
        victim = engine.generate(prompt, SamplingParams(n=2, temperature=0.9, seed=1, max_tokens=300,
                                                        ignore_eos=True), "victim")
        bystander = asyncio.create_task(_collect(engine, prompt, GREEDY, "bystander-error"))
        first = await anext(victim)
        assert not first.finished
        engine._on_core_message("outputs", outputs_to_wire(EngineCoreOutputs([EngineCoreOutput(
            "0:victim", [], finish_reason="error", error="sampling failed for this request")])))
        with pytest.raises(RequestFailedError, match="sampling failed for this request") as info:
            async for _ in victim:
                pass
        assert info.value.output.finished
        assert [c.finish_reason for c in info.value.output.outputs] == ["error", "error"]
        return await bystander

    outs = asyncio.run(main())
    assert outs[-1].outputs[0].token_ids == expected
    # The sibling was aborted in the core; "0:victim" was only pretended to fail, so it runs on
    # to max_tokens there (a real error output means the core has dropped it already).
    asyncio.run(_until(lambda: _idle(engine), 120, "idle engine"))


# ---- leaving a stream aborts its request ---------------------------------------------------
def test_leaving_async_for_aborts_even_while_the_stream_is_referenced(engine, prompt, expected):
    async def main():
        stream = engine.generate(prompt, LONG, "kept-reference")
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 2:
                break
        # ``stream`` is still referenced here: the request is aborted all the same.
        await _until(lambda: _idle(engine), 30, "abort after break")
        assert stream.finished
        with pytest.raises(StopAsyncIteration):
            await anext(stream)

        kept = []
        with pytest.raises(KeyError):
            async for out in (stream2 := engine.generate(prompt, LONG, "raised-in-body")):
                kept.append(stream2)
                raise KeyError("consumer bug")
        await _until(lambda: _idle(engine), 30, "abort after an exception in the loop body")

    asyncio.run(main())
    _serves(engine, prompt, expected, "after-leaving")


def test_manual_iteration_aclosing_cancel_and_drop_abort(engine, prompt, expected):
    async def main():
        # The documented pattern for driving a stream by hand.
        async with contextlib.aclosing(engine.generate(prompt, LONG, "aclosing")) as stream:
            await anext(stream)
        await _until(lambda: _idle(engine), 30, "abort by aclosing")

        # Cancelling the consuming task (a client that disconnected).
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(prompt, LONG, "cancelled"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _until(lambda: _idle(engine), 30, "abort by cancellation")

        # Dropping an unfinished stream that was driven by hand.
        stream = engine.generate(prompt, LONG, "dropped")
        await anext(stream)
        del stream
        gc.collect()
        await _until(lambda: _idle(engine), 30, "abort when dropped")

        # A finished stream's cleanup touches nothing (the id can be reused at once).
        outs = [o async for o in engine.generate(prompt, GREEDY, "reused")]
        outs2 = [o async for o in engine.generate(prompt, GREEDY, "reused")]
        return outs[-1], outs2[-1]

    a, b = asyncio.run(main())
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == expected


# ---- a hung core -----------------------------------------------------------------------------
def test_stopped_core_is_reported_hung_and_recovers(engine, prompt, expected):
    pid = engine.client.proc.pid

    async def healthy() -> bool:
        try:
            await engine.check_health()
        except EngineHungError:
            return False
        return True

    async def main():
        await engine.check_health()
        stream = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                                 "through-the-stop")
        await anext(stream)
        os.kill(pid, signal.SIGSTOP)
        try:
            async def hung() -> bool:
                return not await healthy()

            await _until(hung, 60, "EngineHungError while the core is stopped")
            with pytest.raises(EngineHungError, match="not responded"):
                await engine.check_health()
            assert not engine.errored  # hung is not dead: in-flight requests are left alone
        finally:
            os.kill(pid, signal.SIGCONT)
        await _until(healthy, 60, "healthy again after SIGCONT")
        last = None
        async for last in stream:
            pass
        return last

    last = asyncio.run(main())
    assert last.finished and len(last.outputs[0].token_ids) == 40
    _serves(engine, prompt, expected, "after-sigcont")


def test_heartbeat_timeout_is_validated(tiny_model_dirs):
    for bad in (0, -1, float("nan"), float("inf"), "5", True):
        with pytest.raises(ValueError, match="heartbeat_timeout_s"):
            AsyncLLM(tiny_model_dirs["qwen3"], device="cpu", heartbeat_timeout_s=bad)


# ---- a dead core -----------------------------------------------------------------------------
def test_fatal_core_failure_short_message_reaped_and_pending_requests_fail(tiny_model_dirs, prompt):
    eng = AsyncLLM(tiny_model_dirs["qwen3"], device="cpu")
    try:
        async def main():
            stream = eng.generate(prompt, LONG, "pending")
            await anext(stream)
            # A message the core loop cannot handle: the loop fails (as on a CUDA error).
            eng.client.send("abort", 12345)
            with pytest.raises(EngineDeadError) as info:
                async for _ in stream:
                    pass
            return info.value

        err = asyncio.wait_for(main(), 60)
        err = asyncio.run(err)
        assert str(err) == "engine core failed (TypeError)"  # no traceback, no paths
        assert "Traceback" in err.detail and "core_proc.py" in err.detail  # for the log
        deadline = time.monotonic() + 30
        while eng.client.proc.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert eng.client.proc.exitcode == 1  # exited on its own and reaped: no zombie
        with pytest.raises(EngineDeadError, match="TypeError"):
            asyncio.run(eng.check_health())
        with pytest.raises(EngineDeadError):
            asyncio.run(_collect(eng, prompt, GREEDY, "after-death"))
    finally:
        eng.shutdown()
