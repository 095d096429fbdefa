"""RequestStream: the outputs of one AsyncLLM request as an async iterator.

Why not an async generator: a generator's ``finally`` runs only when the generator is closed or
garbage-collected, so ``gen = engine.generate(...); async for out in gen: break`` left the
request running for as long as ``gen`` was referenced. Here every ``async for`` iterates
through its own cursor, which only that loop references: when the loop is left before the
last output (``break``, an exception, a cancelled task) the cursor is dropped, and dropping an
unfinished cursor aborts the request, whoever still holds the stream.

Code that drives the stream by hand (``await anext(stream)``) owns it the way one owns a file:
``await stream.aclose()`` (or ``async with contextlib.aclosing(stream)``) aborts a request
that is still running; dropping the last reference to an unfinished stream aborts it too.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from minivllm.outputs import RequestOutput

if TYPE_CHECKING:
    from minivllm.engine.async_llm import AsyncLLM
    from minivllm.engine.input_processor import ProcessedPrompt


class RequestFailedError(RuntimeError):
    """The engine failed this request alone (e.g. an error in a step that only concerned
    it); other requests go on. ``str(e)`` is the engine's message (no traceback);
    ``output`` is the request's last ``RequestOutput`` when there is one."""

    def __init__(self, message: str, output: RequestOutput | None = None) -> None:
        super().__init__(message)
        self.output = output


def merge_outputs(pending: RequestOutput, newer: RequestOutput, output_kind: str) -> RequestOutput:
    """One output standing for ``pending`` followed by ``newer`` (two outputs of one request
    that its reader has not taken yet). Cumulative outputs already hold everything: the newer
    one wins. Delta outputs add up: ``pending`` (which nobody else holds) is extended in place
    with the text, token ids and logprobs of ``newer``, and takes its finish state."""
    if output_kind != "delta":
        return newer
    older = {c.index: c for c in pending.outputs}
    for c in newer.outputs:
        old = older.get(c.index)
        if old is None:
            pending.outputs.append(c)
            continue
        old.text += c.text
        old.token_ids.extend(c.token_ids)
        if c.logprobs is not None:
            old.logprobs = (old.logprobs or []) + c.logprobs
        old.finish_reason, old.stop_reason = c.finish_reason, c.stop_reason
        old.cumulative_logprob = c.cumulative_logprob
    pending.finished, pending.metrics, pending.error = newer.finished, newer.metrics, newer.error
    pending.num_cached_tokens = max(pending.num_cached_tokens, newer.num_cached_tokens)
    if pending.prompt_logprobs is None:  # a delta stream carries them once
        pending.prompt_logprobs = newer.prompt_logprobs
    return pending


class OutputQueue:
    """What one request's stream has not read yet, in order, on the stream's event loop.

    Unlike an ``asyncio.Queue``, consecutive outputs merge (``merge_outputs``) while the reader
    lags: a server streaming to hundreds of clients then writes one chunk of several tokens per
    client instead of one chunk per token, so falling behind the engine costs less work, not
    more. Exceptions never merge: they come after everything queued before them.
    """

    def __init__(self, output_kind: str) -> None:
        self._items: collections.deque[RequestOutput | BaseException] = collections.deque()
        self._output_kind = output_kind
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item: RequestOutput | BaseException) -> None:
        last = self._items[-1] if self._items else None
        if isinstance(item, RequestOutput) and isinstance(last, RequestOutput):
            self._items[-1] = merge_outputs(last, item, self._output_kind)
        else:
            self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> RequestOutput | BaseException:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


class RequestStream:
    """Async iterator of one request's ``RequestOutput``s; the last has ``finished=True``.

    Nothing is validated or queued until the first ``__anext__``, which raises what
    ``AsyncLLM.generate`` documents. Also an async context manager: leaving ``async with``
    closes (aborts) the request.
    """

    def __init__(self, engine: AsyncLLM, prepare: Callable[[], ProcessedPrompt],
                 sampling_params: Any, request_id: Any, output_kind: str) -> None:
        self._engine = engine
        self._open_args = (prepare, sampling_params, request_id, output_kind)
        self._state = "new"  # new → running → done
        self._queue: OutputQueue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.request_id: str | None = None  # known once the request is queued

    # ---- iteration -------------------------------------------------------------------------
    def __aiter__(self) -> _Cursor:
        return _Cursor(self)

    async def __anext__(self) -> RequestOutput:
        if self._state == "new":
            self._state = "done"  # if opening fails, the stream is over before it began
            rid, queue = await self._engine._open(*self._open_args)
            self.request_id, self._queue = rid, queue
            self._loop = asyncio.get_running_loop()
            self._state = "running"
        if self._state == "done":
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled: whoever waited for this request is gone
            self._close(abort=True)
            raise
        if isinstance(item, BaseException):
            self._close(abort=False)  # the engine has already dropped it
            raise item
        if item.finished:
            self._close(abort=False)
        return item

    async def aclose(self) -> None:
        """Abort the request if it is still running; later ``__anext__`` calls end the
        iteration. A no-op on a finished stream."""
        self._close(abort=True)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    @property
    def finished(self) -> bool:
        """True once the stream will yield nothing more (finished, failed or closed)."""
        return self._state == "done"

    # ---- ending ----------------------------------------------------------------------------
    def _close(self, abort: bool) -> None:
        if self._state == "running":
            self._engine._close(self.request_id, abort=abort)
        self._state = "done"

    def _abandon(self) -> None:
        """Abort from a finaliser: may run in any thread, so only schedule the work."""
        if self._state == "running":
            self._state = "done"
            self._engine._close_from_anywhere(self.request_id, self._loop)

    def __del__(self) -> None:
        self._abandon()


class _Cursor:
    """What one ``async for`` iterates: a view of the stream that aborts it when dropped
    before the end. Only the loop holds it, so its ``__del__`` runs as the loop is left."""

    __slots__ = ("_stream",)

    def __init__(self, stream: RequestStream) -> None:
        self._stream = stream

    def __aiter__(self) -> _Cursor:
        return self

    def __anext__(self):
        return self._stream.__anext__()

    def __del__(self) -> None:
        self._stream._abandon()
