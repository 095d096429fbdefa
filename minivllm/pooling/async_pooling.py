"""``AsyncLLM.classify / embed / score``: pooling requests to the engine-core process.

A pooling request has exactly one answer (its pooled output, or an error), so each one waits
on a future rather than a stream. The reader thread of ``AsyncLLM`` hands the core's outputs
and add-errors to ``PoolingWaiters`` first; what is not theirs goes on to the generation path.
Cancelling the awaiting task (a client that went away) aborts the requests still running.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from minivllm.engine.core_client import EngineDeadError
from minivllm.engine.input_processor import as_prompt_list
from minivllm.engine.messages import EngineCoreOutput
from minivllm.pooling.frontend import (
    PoolingFrontend,
    make_scores,
    score_pairs,
)
from minivllm.pooling.outputs import PoolingRequestOutput, ScoringRequestOutput
from minivllm.pooling_params import PoolingParams

if TYPE_CHECKING:
    from minivllm.engine.async_llm import AsyncLLM

_ID_PREFIX = "pool-"


class PoolingWaiters:
    """Futures of the pooling requests in flight, by engine request id (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}

    def add(self, rid: str, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        fut = loop.create_future()
        with self._lock:
            self._waiting[rid] = (loop, fut)
        return fut

    def discard(self, rid: str) -> bool:
        """Forget ``rid``; True when it was still waiting (the core may still run it)."""
        with self._lock:
            return self._waiting.pop(rid, None) is not None

    def _resolve(self, rid: str, value: Any, is_error: bool) -> bool:
        with self._lock:
            entry = self._waiting.pop(rid, None)
        if entry is None:
            return False
        loop, fut = entry

        def settle() -> None:
            if not fut.done():
                (fut.set_exception if is_error else fut.set_result)(value)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # the caller's loop is closed: nobody is waiting any more
        return True

    def deliver(self, outputs: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        """Settle the futures of the pooling outputs among ``outputs``; returns the others."""
        if not self._waiting:
            return outputs
        rest = []
        for out in outputs:
            if not out.request_id.startswith(_ID_PREFIX):
                rest.append(out)
            elif out.pooled is not None:
                self._resolve(out.request_id, out, False)
            elif out.finish_reason is not None:
                from minivllm.engine.stream import RequestFailedError

                self._resolve(out.request_id, RequestFailedError(
                    out.error or f"the request ended without a result ({out.finish_reason})"), True)
        return rest

    def fail(self, payload: dict[str, Any]) -> bool:
        """The core could not add a request: fail it if it is one of ours (True)."""
        rid = payload.get("request_id")
        if not isinstance(rid, str) or not rid.startswith(_ID_PREFIX):
            return False
        if payload.get("invalid", True):
            error: BaseException = ValueError(payload["message"])
        else:
            from minivllm.engine.stream import RequestFailedError

            error = RequestFailedError(payload["message"])
        self._resolve(rid, error, True)
        return True

    def fail_all(self, error: EngineDeadError) -> None:
        with self._lock:
            rids = list(self._waiting)
        for rid in rids:
            self._resolve(rid, type(error)(str(error), getattr(error, "detail", None)), True)


async def run_pooling_async(engine: AsyncLLM, task: str, prompts: Any,
                            pooling_params: PoolingParams | Sequence[PoolingParams] | None
                            ) -> list[PoolingRequestOutput]:
    """Pool every prompt; outputs in input order.

    Raises:
        ValueError: bad prompts or parameters, the wrong task (nothing was queued).
        RequestFailedError: the engine failed one of the requests (the others are aborted).
        EngineDeadError: the engine core is gone.
    """
    err = engine.client.dead_error()
    if err is not None:
        raise err
    fe = PoolingFrontend(engine.config, engine.input_processor, engine.max_model_len)
    fe.check_task(task)
    prompt_list = as_prompt_list(prompts)
    params = fe.params_list(pooling_params, len(prompt_list))
    loop = asyncio.get_running_loop()
    processed = await loop.run_in_executor(
        engine._tokenize_pool, lambda: [fe.process(p, sp) for p, sp in zip(prompt_list, params)])
    now, tag = time.time(), uuid.uuid4().hex
    rids = [f"{_ID_PREFIX}{tag}-{i}" for i in range(len(processed))]
    reqs = [fe.make_request(rid, p, sp, now) for rid, p, sp in zip(rids, processed, params)]
    waiters = engine._pooling
    futures = [waiters.add(rid, loop) for rid in rids]
    try:
        engine.client.send("add", [fe.to_wire(r) for r in reqs])
        outs = await asyncio.gather(*futures)
    except BaseException:
        # Cancelled, failed or one request refused: the others must not run on for nobody.
        running = [rid for rid in rids if waiters.discard(rid)]
        for fut in futures:
            if not fut.done():
                fut.cancel()
        if running:
            try:
                engine.client.send("abort", running)
            except Exception:  # a dead or hung core: nothing to stop there
                pass
        raise
    return [fe.make_output(task, rid, p, out) for rid, p, out in zip(rids, processed, outs)]


async def run_score_async(engine: AsyncLLM, text_1: Any, text_2: Any,
                          pooling_params: PoolingParams | None) -> list[ScoringRequestOutput]:
    prompts, pairs = score_pairs(text_1, text_2)
    embeds = await run_pooling_async(engine, "score", prompts, pooling_params)
    return make_scores("score-", embeds, pairs)
