"""AsyncLLM: streaming generation from asyncio, the engine core in its own process.

    engine = AsyncLLM(model)
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32), request_id="r1"):
        print(out.outputs[0].text)

Tokenization, detokenization and stop strings run here, in the caller's process; scheduling
and the model run in the engine-core process (see ``core_proc``), so a slow consumer never
stalls the GPU. Each request streams into its own asyncio queue; leaving the ``async for``
early, or cancelling the task (a client that disconnected), aborts the request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from minivllm.engine.core_client import EngineCoreClient, EngineDeadError
from minivllm.engine.frontend import build_frontend
from minivllm.engine.input_processor import PromptType, child_request_id
from minivllm.engine.serialization import outputs_from_wire, params_to_wire
from minivllm.engine.scheduler import check_prompt_fits
from minivllm.llm import build_engine_config
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams
from minivllm.tokenizer import render_chat

__all__ = ["AsyncLLM", "EngineDeadError"]


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    num_children: int


class AsyncLLM:
    """Async, streaming engine. Takes the same arguments as ``LLM``."""

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        self.config = build_engine_config(model, **engine_kwargs)
        frontend = build_frontend(self.config)
        self.tokenizer = frontend.tokenizer
        self.input_processor = frontend.input_processor
        self.output_processor = frontend.output_processor
        # Guards the output processor and the stream table: the reader thread and the
        # callers' event loops both touch them.
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._stats_waiters: list[concurrent.futures.Future] = []
        self.client = EngineCoreClient(self.config, self._on_core_message)
        self.max_model_len: int = self.client.info["max_model_len"]

    # ---- public API ----------------------------------------------------------------------
    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, *, output_kind: str = "cumulative",
                       ) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs for one prompt; the last one has ``finished=True``.

        ``output_kind``: ``cumulative`` (all text so far), ``delta`` (only the new part) or
        ``final`` (a single output at the end).

        Raises:
            ValueError: bad prompt, parameters or a duplicate request id (nothing was queued).
            EngineDeadError: the engine core is gone.
        """
        processed = self.input_processor.process_prompt(prompt)
        async for out in self._generate(processed, sampling_params, request_id, output_kind):
            yield out

    async def chat(self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None,
                   request_id: str | None = None, *, output_kind: str = "cumulative",
                   ) -> AsyncIterator[RequestOutput]:
        """``generate`` for an OpenAI-style conversation, through the chat template."""
        from minivllm.engine.input_processor import ProcessedPrompt

        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        text = render_chat(self.tokenizer, messages)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        async for out in self._generate(ProcessedPrompt(text, ids), sampling_params, request_id,
                                        output_kind):
            yield out

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with ``finish_reason="abort"``."""
        self._abort(request_id, notify=True)

    async def check_health(self) -> None:
        """Raise EngineDeadError if the engine core is gone."""
        if self.client.dead_reason is not None:
            raise EngineDeadError(self.client.dead_reason)

    @property
    def errored(self) -> bool:
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
        self._fail_all("the engine was shut down")

    def __enter__(self) -> "AsyncLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- request life ----------------------------------------------------------------------
    async def _generate(self, processed, sampling_params, request_id, output_kind):
        await self.check_health()
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        check_prompt_fits(len(processed.prompt_token_ids), self.max_model_len)
        rid = request_id if request_id is not None else uuid.uuid4().hex
        now = time.time()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.output_processor.add_request(rid, processed, params, now, output_kind)
            self._streams[rid] = _Stream(asyncio.get_running_loop(), queue, params.n)
        reqs = self.input_processor.make_requests(rid, processed, params, now)
        finished = False
        try:
            self.client.send("add", [{
                "request_id": r.request_id, "prompt_token_ids": r.prompt_token_ids,
                "params": params_to_wire(r.params), "arrival_time": r.arrival_time,
                "eos_token_ids": sorted(r.eos_token_ids), "seed": r.seed} for r in reqs])
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer left early or was cancelled: free the slot
                self._abort(rid, notify=False)
            with self._lock:
                self._streams.pop(rid, None)

    def _abort(self, rid: str, notify: bool) -> None:
        with self._lock:
            out = self.output_processor.abort(rid)
            stream = self._streams.get(rid)
        if out is None:
            return
        n = stream.num_children if stream is not None else 1
        try:
            self.client.send("abort", [child_request_id(rid, i) for i in range(n)])
        except EngineDeadError:
            pass
        if notify:
            self._deliver(rid, out)

    # ---- messages from the core (reader thread) --------------------------------------------
    def _deliver(self, rid: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _on_core_message(self, kind: str, payload: Any) -> None:
        if kind == "outputs":
            outs = outputs_from_wire(payload)
            with self._lock:
                results, to_abort = self.output_processor.process(outs.outputs)
                for out in results:
                    self._deliver(out.request_id, out)
            if to_abort:
                self.client.send("abort", to_abort)
        elif kind == "error":
            parent = payload["request_id"].split(":", 1)[1]
            with self._lock:
                self.output_processor.abort(parent)
                stream = self._streams.get(parent)
                self._deliver(parent, ValueError(payload["message"]))
            if stream is not None and stream.num_children > 1:
                self.client.send("abort", [child_request_id(parent, i) for i in range(stream.num_children)])
        elif kind == "stats":
            with self._lock:
                waiters, self._stats_waiters = self._stats_waiters, []
            for fut in waiters:
                fut.set_result(payload)
        elif kind == "dead":
            self._fail_all(payload)

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            self.output_processor.fail_all()
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(reason))
            waiters, self._stats_waiters = self._stats_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_exception(EngineDeadError(reason))
