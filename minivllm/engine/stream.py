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
        self._queue: asyncio.Queue | None = None
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
