"""AsyncLLM: streaming from an engine core in its own process (ZMQ), aborts, errors, death."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from minivllm import LLM, AsyncLLM, EngineDeadError, SamplingParams
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model_dirs):
    eng = AsyncLLM(tiny_model_dirs["qwen3"], device="cpu")
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model_dirs):
    return LLM(tiny_model_dirs["qwen3"], device="cpu")


async def _collect(engine, prompt, params, rid, **kw):
    return [out async for out in engine.generate(prompt, params, rid, **kw)]


def test_streams_growing_outputs_and_matches_offline(engine, reference):
    prompt = random_prompts([20], seed=51)[0]
    outs = asyncio.run(_collect(engine, prompt, GREEDY, "stream-1"))
    # One output per step while the reader keeps up; steps it missed arrive merged.
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(set(lengths)) and lengths[0] >= 1 and lengths[-1] == 12
    assert len(outs) > 1
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    expected = reference.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert outs[-1].outputs[0].token_ids == expected
    assert outs[-1].outputs[0].finish_reason == "length"


def test_concurrent_requests_each_match_offline_and_delta_mode(engine, reference):
    prompts = random_prompts([3, 40, 17, 9, 64, 1], seed=52)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, GREEDY, use_tqdm=False)]

    async def main():
        cumulative = [_collect(engine, p, GREEDY, f"conc-{i}") for i, p in enumerate(prompts[:3])]
        delta = [_collect(engine, p, GREEDY, f"delta-{i}", output_kind="delta")
                 for i, p in enumerate(prompts[3:])]
        return await asyncio.gather(*cumulative, *delta)

    results = asyncio.run(main())
    for outs, exp in zip(results[:3], expected[:3]):
        assert outs[-1].outputs[0].token_ids == exp
    for outs, exp in zip(results[3:], expected[3:]):
        assert sum((o.outputs[0].token_ids for o in outs), []) == exp  # deltas add up


def test_a_slow_reader_gets_the_steps_it_missed_merged(engine, reference):
    """A reader that lags the engine gets fewer outputs, each carrying several tokens (delta)
    or the latest state (cumulative), and nothing is lost or repeated."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1)
    prompt = random_prompts([12], seed=57)[0]
    expected = reference.generate([prompt], params, use_tqdm=False)[0].outputs[0]

    async def slow(kind):
        outs = []
        async for out in engine.generate(prompt, params, f"slow-{kind}", output_kind=kind):
            outs.append(out)
            time.sleep(0.05)  # blocks the loop: the engine runs ahead meanwhile
        return outs

    delta = asyncio.run(slow("delta"))
    assert len(delta) < 40
    assert sum((o.outputs[0].token_ids for o in delta), []) == expected.token_ids
    logprobs = sum((o.outputs[0].logprobs for o in delta), [])
    assert [set(lp) for lp in logprobs] == [set(lp) for lp in expected.logprobs]
    assert delta[-1].finished and delta[-1].outputs[0].finish_reason == "length"
    cumulative = asyncio.run(slow("cumulative"))
    assert len(cumulative) < 40 and cumulative[-1].outputs[0].token_ids == expected.token_ids


def test_abort_and_early_exit_leave_other_requests_untouched(engine, reference):
    long_params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    prompt = random_prompts([10], seed=53)[0]
    expected = reference.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids

    async def main():
        async def aborted():
            outs = []
            async for out in engine.generate(prompt, long_params, "to-abort"):
                outs.append(out)
                if len(outs) == 3:
                    await engine.abort("to-abort")
            return outs

        async def left_early():
            async for out in engine.generate(prompt, long_params, "left-early"):
                if len(out.outputs[0].token_ids) >= 2:
                    break  # the generator's cleanup aborts the request

        normal = asyncio.create_task(_collect(engine, prompt, GREEDY, "bystander"))
        ab = await aborted()
        await left_early()
        return ab, await normal

    aborted_outs, normal_outs = asyncio.run(main())
    assert aborted_outs[-1].finished and aborted_outs[-1].outputs[0].finish_reason == "abort"
    assert len(aborted_outs[-1].outputs[0].token_ids) < 200
    assert normal_outs[-1].outputs[0].token_ids == expected

    async def idle():
        for _ in range(100):
            stats = await engine.stats()
            if stats["num_running"] == 0 and stats["num_waiting"] == 0:
                return stats
            await asyncio.sleep(0.05)
        return stats

    assert asyncio.run(idle())["num_running"] == 0  # nothing left running in the core


def test_bad_requests_fail_alone(engine):
    prompt = random_prompts([8], seed=54)[0]

    async def main():
        with pytest.raises(ValueError, match="empty"):
            await _collect(engine, [], GREEDY, "bad-empty")
        with pytest.raises(ValueError, match="max_model_len"):
            await _collect(engine, [1] * 600, GREEDY, "bad-long")
        with pytest.raises(ValueError, match="out of vocabulary"):
            await _collect(engine, [10**6], GREEDY, "bad-vocab")

        async def holder():
            return await _collect(engine, prompt, GREEDY, "dup")

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="already in use"):
            await _collect(engine, prompt, GREEDY, "dup")
        good = await first
        n2 = await _collect(engine, prompt, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=5), "n2")
        return good, n2

    good, n2 = asyncio.run(main())
    assert good[-1].finished and len(good[-1].outputs[0].token_ids) == 12
    assert [len(c.token_ids) for c in n2[-1].outputs] == [5, 5]


def test_dead_engine_core_is_reported(tiny_model_dirs):
    eng = AsyncLLM(tiny_model_dirs["llama"], device="cpu")
    try:
        prompt = random_prompts([5], seed=55)[0]
        long_params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)

        async def main():
            killed = False
            async for out in eng.generate(prompt, long_params, "doomed"):
                # >= : a reader that lags gets steps merged, so exactly 2 may never be seen.
                if len(out.outputs[0].token_ids) >= 2 and not killed:
                    os.kill(eng.client.proc.pid, signal.SIGKILL)
                    killed = True

        with pytest.raises(EngineDeadError, match="exited unexpectedly"):
            asyncio.run(asyncio.wait_for(main(), 60))  # the pending stream fails promptly
        assert eng.errored
        assert eng.client.proc.exitcode == -signal.SIGKILL  # reaped, not left as a zombie
        with pytest.raises(EngineDeadError):
            asyncio.run(eng.check_health())
        with pytest.raises(EngineDeadError):
            asyncio.run(_collect(eng, prompt, GREEDY, "after-death"))
    finally:
        eng.shutdown()


def test_streamed_text_with_stop_string_never_leaks_it(smollm_dir, smol_llm):
    msgs = [{"role": "user", "content": "Count from one to ten in words, separated by commas."}]
    free = smol_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0].text
    stop = free[12:17]
    expected = free[:free.index(stop)]
    params = SamplingParams(temperature=0, max_tokens=40, stop=[stop])

    async def main(eng):
        deltas = [o async for o in eng.chat(msgs, params, "delta-stop", output_kind="delta")]
        cumulative = [o async for o in eng.chat(msgs, params, "cum-stop")]
        return deltas, cumulative

    with AsyncLLM(smollm_dir, device="cpu") as eng:
        deltas, cumulative = asyncio.run(main(eng))
    assert "".join(o.outputs[0].text for o in deltas) == expected
    assert all(stop not in o.outputs[0].text for o in cumulative)
    assert cumulative[-1].outputs[0].text == expected
    assert cumulative[-1].outputs[0].finish_reason == "stop"
    # Cumulative texts only ever grow (held-back characters are never taken back).
    texts = [o.outputs[0].text for o in cumulative]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_engine_core_exits_when_its_frontend_is_killed(tiny_model_dirs):
    import subprocess
    import sys
    import time

    script = (
        "import os, signal, sys\n"
        "from minivllm import AsyncLLM\n"
        "if __name__ == '__main__':\n"
        f"    eng = AsyncLLM({tiny_model_dirs['llama']!r}, device='cpu')\n"
        "    print(eng.client.proc.pid, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    core_pid = int(proc.stdout.split()[0])

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:  # a zombie is as good as gone
            return f.read().split()[2] != "Z"

    deadline = time.monotonic() + 15
    while alive(core_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(core_pid), "the engine core outlived its killed frontend"
