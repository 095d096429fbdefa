"""AsyncLLM: streaming generation from asyncio, the engine core in its own process.

    engine = AsyncLLM(model)
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32), request_id="r1"):
        print(out.outputs[0].text)

Tokenization, detokenization and stop strings run here, in the caller's process (tokenization
on a worker thread, so a huge prompt never stalls the event loop); scheduling and the model run
in the engine-core process (see ``core_proc``), so a slow consumer never stalls the GPU. Each
request streams into its own asyncio queue (see ``stream.RequestStream``); leaving the
``async for`` early, or cancelling the task (a client that disconnected), aborts the request.

Failures stay as small as they can: a bad request raises ``ValueError`` before anything is
queued; a request the engine failed alone raises ``RequestFailedError`` from its stream while
the others go on; only a dead core (``EngineDeadError``) fails everything.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from minivllm.engine.core_client import EngineCoreClient, EngineDeadError, EngineHungError
from minivllm.engine.frontend import build_frontend
from minivllm.engine.input_processor import (ProcessedPrompt, PromptType, check_text,
                                             child_request_id)
from minivllm.engine.scheduler import check_prompt_fits
from minivllm.engine.serialization import outputs_from_wire, params_to_wire
from minivllm.engine.stream import OutputQueue, RequestFailedError, RequestStream
from minivllm.engine_args import EngineArgs
from minivllm.outputs import RequestOutput
from minivllm.pooling.async_pooling import PoolingWaiters, run_pooling_async, run_score_async
from minivllm.pooling.outputs import (ClassificationRequestOutput, EmbeddingRequestOutput,
                                      ScoringRequestOutput)
from minivllm.pooling_params import PoolingParams
from minivllm.sampling_params import SamplingParams
from minivllm.tokenizer import render_chat

__all__ = ["AsyncLLM", "EngineDeadError", "EngineHungError", "RequestFailedError", "RequestStream"]

# A CPU step of a full default token budget can take tens of seconds on a small machine;
# a core silent for longer than this is treated as hung.
DEFAULT_HEARTBEAT_TIMEOUT_S = 60.0


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: OutputQueue
    num_children: int


def _put_all(deliveries: list[tuple[OutputQueue, RequestOutput | BaseException]]) -> None:
    """On a stream's event loop: one step's outputs for every stream of that loop."""
    for queue, item in deliveries:
        queue.put_nowait(item)


class AsyncLLM:
    """Async, streaming engine. Takes the same arguments as ``LLM`` (the fields of
    ``EngineArgs``), plus:

    ``heartbeat_timeout_s``: ``check_health()`` raises ``EngineHungError`` once the engine
    core has not been heard from for this long (it reports at least every 0.5 s between steps,
    so a single step longer than this counts as hung too).
    """

    def __init__(self, model: str | None = None, *,
                 heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
                 **engine_kwargs: Any) -> None:
        if (not isinstance(heartbeat_timeout_s, (int, float)) or isinstance(heartbeat_timeout_s, bool)
                or not math.isfinite(heartbeat_timeout_s) or heartbeat_timeout_s <= 0):
            raise ValueError(f"heartbeat_timeout_s must be a positive number, got {heartbeat_timeout_s!r}")
        self.heartbeat_timeout_s = float(heartbeat_timeout_s)
        self.config = EngineArgs.from_kwargs(model, engine_kwargs, "AsyncLLM").create_engine_config()
        frontend = build_frontend(self.config)
        self.tokenizer = frontend.tokenizer
        self.input_processor = frontend.input_processor
        self.output_processor = frontend.output_processor
        # Guards the output processor and the stream table: the reader thread and the
        # callers' event loops both touch them.
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._stats_waiters: list[concurrent.futures.Future] = []
        self._pooling = PoolingWaiters()  # classify/embed requests in flight
        # One thread: tokenizers are not safe to call from several threads at once.
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="minivllm-tokenize")
        self.client = EngineCoreClient(self.config, self._on_core_message)
        self.max_model_len: int = self.client.info["max_model_len"]

    # ---- public API ----------------------------------------------------------------------
    def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                 request_id: str | None = None, *, output_kind: str = "cumulative",
                 ) -> RequestStream:
        """Stream RequestOutputs for one prompt; the last one has ``finished=True``.

        ``output_kind``: ``cumulative`` (all text so far), ``delta`` (only the new part) or
        ``final`` (a single output at the end). A reader that falls behind the engine gets
        the outputs it missed merged into one: a delta output then carries several tokens, a
        cumulative one skips to the latest. Nothing happens until the stream is first
        iterated; then:

        Raises:
            ValueError: bad prompt, parameters or a duplicate request id (nothing was queued).
            RequestFailedError: the engine failed this request (others go on).
            EngineDeadError: the engine core is gone.
        """
        return RequestStream(self, lambda: self.input_processor.process_prompt(prompt),
                             sampling_params, request_id, output_kind)

    def chat(self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None,
             request_id: str | None = None, *, output_kind: str = "cumulative") -> RequestStream:
        """``generate`` for an OpenAI-style conversation, through the chat template."""
        def prepare() -> ProcessedPrompt:
            if self.tokenizer is None:
                raise ValueError("chat needs a tokenizer")
            text = render_chat(self.tokenizer, messages)
            check_text(text, "messages")
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return ProcessedPrompt(text, ids)

        return RequestStream(self, prepare, sampling_params, request_id, output_kind)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with ``finish_reason="abort"``."""
        self._abort(request_id, notify=True)

    async def check_health(self) -> None:
        """Raise EngineDeadError if the engine core is gone, or EngineHungError (a subclass)
        if it has not been heard from within ``heartbeat_timeout_s``."""
        err = self.client.dead_error()
        if err is not None:
            raise err
        silent_s = self.client.seconds_since_heard()
        if silent_s > self.heartbeat_timeout_s:
            raise EngineHungError(f"the engine core has not responded for {silent_s:.0f} s")

    @property
    def errored(self) -> bool:
        """True once the engine core is dead (for good)."""
        return self.client.dead_reason is not None

    async def stats(self, timeout_s: float = 30.0) -> dict:
        """The engine core's counters (as ``LLM.stats()``)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._stats_waiters.append(fut)
        self.client.send("stats")
        return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)

    def get_tokenizer(self):
        return self.tokenizer

    def shutdown(self) -> None:
        """Stop the engine core process. Pending streams end with EngineDeadError."""
        self.client.shutdown()
        self._fail_all(EngineDeadError("the engine was shut down"))
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> AsyncLLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- request life (called by RequestStream) ------------------------------------------
    async def _open(self, prepare: Callable[[], ProcessedPrompt], sampling_params: Any,
                    request_id: Any, output_kind: str) -> tuple[str, OutputQueue]:
        """Validate, tokenize and queue one request; returns its id and output queue."""
        err = self.client.dead_error()
        if err is not None:
            raise err
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if request_id is not None and not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
        self.input_processor.check_params(params)
        loop = asyncio.get_running_loop()
        processed = await loop.run_in_executor(self._tokenize_pool, prepare)
        check_prompt_fits(len(processed.prompt_token_ids), self.max_model_len)
        rid = request_id if request_id is not None else uuid.uuid4().hex
        now = time.time()
        queue = OutputQueue(output_kind)
        with self._lock:
            self.output_processor.add_request(rid, processed, params, now, output_kind)
            self._streams[rid] = _Stream(loop, queue, params.n)
        reqs = self.input_processor.make_requests(rid, processed, params, now)
        try:
            self.client.send("add", [{
                "request_id": r.request_id, "prompt_token_ids": r.prompt_token_ids,
                "params": params_to_wire(r.params), "arrival_time": r.arrival_time,
                "eos_token_ids": sorted(r.eos_token_ids), "seed": r.seed} for r in reqs])
        except (OverflowError, TypeError, UnicodeError) as e:  # params changed after validation
            self._close(rid, abort=True)
            raise ValueError(f"the request cannot be sent to the engine core ({e})") from None
        except BaseException:
            self._close(rid, abort=True)
            raise
        return rid, queue

    def _close(self, rid: str, abort: bool) -> None:
        """The stream of ``rid`` is done with: forget it, aborting the request if it runs."""
        if abort:
            self._abort(rid, notify=False)
        with self._lock:
            self._streams.pop(rid, None)

    def _close_from_anywhere(self, rid: str, loop: asyncio.AbstractEventLoop) -> None:
        """``_close(rid, abort=True)`` for a stream dropped without being closed. Called from
        ``__del__``, which may run in any thread and while ``self._lock`` is held: schedule
        the work on the stream's loop instead of doing it here."""
        try:
            loop.call_soon_threadsafe(self._close, rid, True)
        except RuntimeError:  # the loop is closed already
            threading.Thread(target=self._close, args=(rid, True), daemon=True).start()

    def _abort(self, rid: str, notify: bool) -> None:
        with self._lock:
            out = self.output_processor.abort(rid)
        if out is None:
            return
        try:
            self.client.send("abort", [child_request_id(rid, c.index) for c in out.outputs])
        except EngineDeadError:
            pass  # dead: nothing runs any more; hung: the core cannot be told anyway
        if notify:
            with self._lock:
                self._deliver(rid, out)

    # ---- messages from the core (reader thread) --------------------------------------------
    def _deliver(self, rid: str, item: RequestOutput | BaseException) -> bool:
        """Hand ``item`` to the stream of ``rid`` (call with ``self._lock`` held). False when
        nobody can ever read it: the stream's event loop is closed (the caller aborts it)."""
        stream = self._streams.get(rid)
        if stream is None:
            return True
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:
            self._streams.pop(rid, None)
            return False
        return True

    def _deliver_step(self, results: list[RequestOutput]) -> list[str]:
        """Hand one step's outputs to their streams (call with ``self._lock`` held): one
        wake-up per event loop, not one per stream. Returns the unfinished requests nobody
        can read any more (their loop is closed): the caller aborts them."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[OutputQueue, Any, RequestOutput]]] = {}
        for out in results:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                item = RequestFailedError(out.error, out) if out.error is not None else out
                by_loop.setdefault(stream.loop, []).append((stream.queue, item, out))
        orphans = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, [(q, item) for q, item, _ in batch])
            except RuntimeError:  # that loop is closed
                for _, _, out in batch:
                    self._streams.pop(out.request_id, None)
                    if not out.finished:
                        orphans.append(out.request_id)
        return orphans

    def _on_core_message(self, kind: str, payload: Any) -> None:
        if kind == "outputs":
            outs = outputs_from_wire(payload)
            outs.outputs = self._pooling.deliver(outs.outputs)
            with self._lock:
                results, to_abort = self.output_processor.process(outs.outputs)
                orphans = self._deliver_step(results)
            if to_abort:
                self._send_abort(to_abort)
            for rid in orphans:
                self._abort(rid, notify=False)
        elif kind == "error":
            self._on_add_error(payload)
        elif kind == "stats":
            with self._lock:
                waiters, self._stats_waiters = self._stats_waiters, []
            for fut in waiters:
                fut.set_result(payload)
        elif kind == "dead":
            self._fail_all(self.client.dead_error() or EngineDeadError(str(payload)))

    def _on_add_error(self, payload: dict[str, Any]) -> None:
        """The core could not add (one sequence of) a request: fail that request alone."""
        if self._pooling.fail(payload):
            return
        child = payload.get("request_id")
        parent = child.split(":", 1)[1] if isinstance(child, str) and ":" in child else None
        if parent is None:
            return  # not one of ours; nothing to fail
        error: BaseException = (ValueError(payload["message"]) if payload.get("invalid", True)
                                else RequestFailedError(payload["message"]))
        with self._lock:
            self.output_processor.abort(parent)
            stream = self._streams.get(parent)
            self._deliver(parent, error)
        if stream is not None and stream.num_children > 1:
            self._send_abort([child_request_id(parent, i) for i in range(stream.num_children)])

    def _send_abort(self, ids: list[str]) -> None:
        try:
            self.client.send("abort", ids)
        except EngineDeadError:
            pass

    def _fail_all(self, error: EngineDeadError) -> None:
        self._pooling.fail_all(error)
        with self._lock:
            self.output_processor.fail_all()
            for rid in list(self._streams):  # one exception object per stream: each is raised
                self._deliver(rid, type(error)(str(error), error.detail))
            waiters, self._stats_waiters = self._stats_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_exception(error)

    # ---- pooling models: classify / embed / score (see minivllm/pooling/) -----------------
    async def classify(self, prompts: PromptType | list[PromptType],
                       pooling_params: PoolingParams | list[PoolingParams] | None = None,
                       ) -> list[ClassificationRequestOutput]:
        """``LLM.classify`` from asyncio: the prompts join the engine's packed prefill steps
        together with other callers' prompts; cancelling the call aborts them.

        Raises:
            ValueError: bad prompts or parameters, or not a classifier (nothing was queued).
            RequestFailedError: the engine failed one of the requests.
            EngineDeadError: the engine core is gone.
        """
        return await run_pooling_async(self, "classify", prompts, pooling_params)

    async def embed(self, prompts: PromptType | list[PromptType],
                    pooling_params: PoolingParams | list[PoolingParams] | None = None,
                    ) -> list[EmbeddingRequestOutput]:
        """``LLM.embed`` from asyncio; raises as ``classify``."""
        return await run_pooling_async(self, "embed", prompts, pooling_params)

    async def score(self, text_1: PromptType | list[PromptType], text_2: PromptType | list[PromptType],
                    pooling_params: PoolingParams | None = None) -> list[ScoringRequestOutput]:
        """``LLM.score`` from asyncio; raises as ``classify``."""
        return await run_score_async(self, text_1, text_2, pooling_params)
