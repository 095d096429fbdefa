"""OutputQueue and merge_outputs: what a lagging reader of a stream receives."""

from __future__ import annotations

import asyncio

from minivllm.engine.stream import OutputQueue, RequestFailedError, merge_outputs
from minivllm.entrypoints.openai.serving import _merge_waiting
from minivllm.outputs import CompletionOutput, RequestOutput


def _out(tokens: list[int], text: str, finish: str | None = None, index: int = 0,
         prompt_logprobs=None) -> RequestOutput:
    c = CompletionOutput(index, text, list(tokens), finish, logprobs=[{t: -1.0} for t in tokens],
                         cumulative_logprob=-1.0 * tokens[-1] if tokens else None)
    return RequestOutput("r", None, [1, 2], [c], finish is not None, prompt_logprobs=prompt_logprobs)


def test_deltas_add_up_and_take_the_newer_finish_state():
    merged = merge_outputs(_out([5], "a", prompt_logprobs=[None]), _out([6, 7], "bc", "length"), "delta")
    c = merged.outputs[0]
    assert (c.text, c.token_ids, c.finish_reason) == ("abc", [5, 6, 7], "length")
    assert [list(lp) for lp in c.logprobs] == [[5], [6], [7]]
    assert c.cumulative_logprob == -7.0 and merged.finished
    assert merged.prompt_logprobs == [None]  # carried once, by the first delta


def test_cumulative_outputs_keep_the_latest():
    newer = _out([5, 6], "ab")
    assert merge_outputs(_out([5], "a"), newer, "cumulative") is newer


def test_n_completions_merge_by_index():
    a = RequestOutput("r", None, [1], [CompletionOutput(0, "x", [1]), CompletionOutput(1, "y", [2])], False)
    b = RequestOutput("r", None, [1], [CompletionOutput(0, "", [], "stop"), CompletionOutput(1, "z", [3])], False)
    merged = merge_outputs(a, b, "delta")
    assert [(c.text, c.token_ids, c.finish_reason) for c in merged.outputs] == [
        ("x", [1], "stop"), ("yz", [2, 3], None)]


def test_queue_merges_while_unread_and_keeps_errors_after_outputs():
    async def main():
        q = OutputQueue("delta")
        q.put_nowait(_out([1], "a"))
        q.put_nowait(_out([2], "b"))
        err = RequestFailedError("boom")
        q.put_nowait(err)
        q.put_nowait(_out([3], "c"))  # never merges across the error
        first = await q.get()
        assert first.outputs[0].token_ids == [1, 2] and first.outputs[0].text == "ab"
        assert await q.get() is err
        assert (await q.get()).outputs[0].token_ids == [3]
        assert len(q) == 0
        # A waiting reader wakes on the next put.
        waiter = asyncio.ensure_future(q.get())
        await asyncio.sleep(0)
        q.put_nowait(_out([4], "d"))
        assert (await waiter).outputs[0].token_ids == [4]

    asyncio.run(main())


def test_serving_merges_each_prompts_run_of_deltas_only():
    err = ValueError("bad")
    waiting = [(0, _out([1], "a")), (1, _out([9], "z")), (0, _out([2], "b")), (1, None),
               (0, err), (0, _out([3], "c")), (0, _out([4], "d", "length"))]
    merged = _merge_waiting(waiting)
    shape = [(i, item if not isinstance(item, RequestOutput) else item.outputs[0].token_ids)
             for i, item in merged]
    assert shape == [(0, [1, 2]), (1, [9]), (1, None), (0, err), (0, [3, 4])]
    assert merged[-1][1].finished
