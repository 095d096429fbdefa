"""The generation endpoints: admission, prompts → engine requests, JSON or SSE back, and drain.

Every request is validated completely (fields, limits, prompt lengths, the engine's own checks
through its first output) before a status code is chosen, so a bad request is a 4xx that
touched nothing. An admitted request holds one slot of ``max_concurrent_requests`` until its
response is complete; a client that goes away, mid-stream or while waiting for a non-streamed
answer, has its engine requests aborted. When the server drains and the grace period ends,
``expire_all`` aborts what is left: streams end with an error event and ``[DONE]``, others get
503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from minivllm.engine.core_client import EngineDeadError

from minivllm.engine.stream import RequestFailedError, merge_outputs
from minivllm.entrypoints.openai import responses
from minivllm.entrypoints.openai.metrics import ServerMetrics
from minivllm.entrypoints.openai.prompts import Prompt, PromptPreparer
from minivllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    error_body,
    new_id,
    parse_request,
)
from minivllm.entrypoints.openai.settings import ServerSettings
from minivllm.outputs import CompletionOutput, RequestOutput
from minivllm.sampling_params import SamplingParams

logger = logging.getLogger("minivllm.server")

SHUTTING_DOWN = "the server is shutting down; the request was not completed"


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response."""
    # ensure_ascii: whatever text the engine produced, the bytes on the wire are valid UTF-8.
    return Response(json.dumps(payload).encode(), status, headers, media_type="application/json")


def error_response(e: RequestError) -> Response:
    """The OpenAI-style error response for ``e`` (``Retry-After`` on 429 / 503)."""
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return json_response(error_body(str(e), e.error_type, e.status, e.param), e.status, headers)


def public_message(e: BaseException, fallback: str) -> str:
    """An engine error's message as a client may see it: no tracebacks, no file paths."""
    text = str(e).strip()
    first = text.splitlines()[0].rstrip(":").strip() if text else ""
    if not first or "Traceback" in text or "File \"" in text or ".py" in first:
        return fallback
    return first[:500]


def engine_dead_error(e: BaseException) -> RequestError:
    logger.error("engine core is not available: %s", getattr(e, "detail", None) or e)
    return RequestError(f"the engine is not available: {public_message(e, 'engine core failed')}",
                        503, "server_error")


def engine_error(e: BaseException) -> RequestError | None:
    """The HTTP error for what the engine raised about one request (None: not the engine's)."""
    if isinstance(e, RequestError):
        return e
    if isinstance(e, EngineDeadError):
        return engine_dead_error(e)
    if isinstance(e, RequestFailedError):  # the engine failed this request alone
        logger.warning("request failed in the engine: %s", e)
        return RequestError(public_message(e, "the request failed in the engine"), 500, "server_error")
    if isinstance(e, ValueError):  # the engine's own validation
        return RequestError(public_message(e, "the engine refused the request"))
    return None


async def read_body(request: Request, settings: ServerSettings) -> bytes:
    """The request body, within the size limit (chunked bodies included) and the read deadline."""
    limit = settings.max_request_body_bytes

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"request body over {limit} bytes", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), settings.timeout_request_read_s)
    except asyncio.TimeoutError:
        raise RequestError(f"request body not received within {settings.timeout_request_read_s:g} s",
                           408) from None


class _ClientGone(Exception):
    """The client closed the connection; nothing more to send."""


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; cancel it and raise _ClientGone if the client disconnects first."""
    async def wait_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work_task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({work_task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (work_task, watch):
            t.cancel()
        await asyncio.gather(work_task, watch, return_exceptions=True)
    if work_task.cancelled():
        raise _ClientGone
    return work_task.result()


@dataclass(eq=False)
class _Admission:
    """One admitted HTTP request: its engine request ids, and whether drain ended it."""

    request_ids: list[str] = field(default_factory=list)
    expired: bool = False


@dataclass
class _Job:
    """What one generation request runs: its prompts and parameters."""

    rid: str
    chat: bool
    prompts: list[Prompt]
    params: SamplingParams
    stream: bool
    include_usage: bool
    num_top_logprobs: int | None = None  # chat logprobs: how many alternatives per token
    echo: bool = False


class OpenAIServing:
    """Runs the completions and chat endpoints against one ``AsyncLLM``."""

    def __init__(self, engine: Any, served_model_name: str, settings: ServerSettings,
                 metrics: ServerMetrics) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self.settings = settings
        self.metrics = metrics
        self.tokenizer = getattr(engine, "tokenizer", None)
        self.max_model_len: int = engine.max_model_len
        vocab = getattr(getattr(engine, "input_processor", None), "vocab_size", None)
        self.prompts = PromptPreparer(self.tokenizer, self.max_model_len, vocab,
                                      settings.prompt_char_limit(self.max_model_len), settings.chat_template)
        self.draining = False
        self._admitted: set[_Admission] = set()

    @property
    def num_in_flight(self) -> int:
        return len(self._admitted)

    def close(self) -> None:
        """Stop the tokenizer thread."""
        self.prompts.close()

    # ---- admission and drain ------------------------------------------------------------------
    def _admit(self) -> _Admission:
        if self.draining:
            raise RequestError(SHUTTING_DOWN, 503, "server_error")
        if len(self._admitted) >= self.settings.max_concurrent_requests:
            raise RequestError(f"too many concurrent requests (limit {self.settings.max_concurrent_requests}); "
                               "retry later", 429, "rate_limit_error")
        adm = _Admission()
        self._admitted.add(adm)
        return adm

    def _release(self, adm: _Admission) -> None:
        self._admitted.discard(adm)  # idempotent: error paths may release twice

    async def expire_all(self) -> None:
        """Drain's grace period is over: abort every admitted request (see module docstring)."""
        for adm in list(self._admitted):
            adm.expired = True
            for rid in adm.request_ids:
                try:
                    await self.engine.abort(rid)
                except Exception as e:  # a dead engine has nothing left to abort
                    logger.debug("abort of %s at shutdown failed: %r", rid, e)

    def check_model(self, model: str | None) -> None:
        """404 unless ``model`` is absent or the served model's name."""
        if model is not None and model != self.served_model_name:
            raise RequestError(f"model {model!r} does not exist; this server serves {self.served_model_name!r}",
                               404, "NotFoundError", "model")

    # ---- endpoints ----------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``."""
        body = await read_body(request, self.settings)
        req: CompletionRequest = parse_request(CompletionRequest, body)
        req.check_refused()
        self.check_model(req.model)
        prompts = req.prompts()
        self._check_counts(req.n, len(prompts))
        # echo with logprobs lists the prompt tokens' logprobs too: the engine computes them.
        prompt_logprobs = req.prompt_logprobs
        if req.echo and req.logprobs is not None:
            prompt_logprobs = max(prompt_logprobs or 0, req.logprobs)
        params = req.sampling_params(req.max_tokens, req.logprobs, prompt_logprobs)
        for p in prompts:
            if isinstance(p, str):
                self.prompts.check_chars(len(p), "prompt")
        self._check_token_ids(params)
        adm = self._admit()
        try:
            add_special = req.add_special_tokens if req.add_special_tokens is not None else True
            ready = [await self.prompts.completion_prompt(p, add_special, req.truncate_prompt_tokens,
                                                          req.max_tokens) for p in prompts]
            job = _Job(new_id("cmpl"), False, ready, params, req.stream, req.include_usage, echo=req.echo)
            return await self._run(request, adm, job)
        except BaseException:
            self._release(adm)
            raise

    async def chat(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        body = await read_body(request, self.settings)
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, body)
        req.check_refused()
        self.check_model(req.model)
        self._check_counts(req.n, 1)
        params = req.sampling_params(req.max_new_tokens, req.num_logprobs)
        self._check_token_ids(params)
        adm = self._admit()
        try:
            prompt = await self.prompts.chat_prompt(
                req.messages, req.add_generation_prompt, req.continue_final_message, req.chat_template_kwargs,
                bool(req.add_special_tokens), req.truncate_prompt_tokens, req.max_new_tokens)
            job = _Job(new_id("chatcmpl"), True, [prompt], params, req.stream, req.include_usage,
                       num_top_logprobs=(req.top_logprobs or 0) if req.logprobs else None)
            return await self._run(request, adm, job)
        except BaseException:
            self._release(adm)
            raise

    def _check_counts(self, n: int, num_prompts: int) -> None:
        if n > self.settings.max_n:
            raise RequestError(f"n must be at most {self.settings.max_n} on this server (--max-n)", param="n")
        if num_prompts > self.settings.max_prompts_per_request:
            raise RequestError(f"at most {self.settings.max_prompts_per_request} prompts per request on this "
                               f"server (--max-prompts-per-request), got {num_prompts}", param="prompt")

    def _check_token_ids(self, params: SamplingParams) -> None:
        """400 naming the field for a token id beyond the vocabulary (the engine would refuse
        logit_bias / allowed_token_ids too, but without saying which field)."""
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias),
                          ("allowed_token_ids", params.allowed_token_ids)):
            if ids:
                self.prompts.check_token_ids(list(ids), name)

    # ---- running a job ------------------------------------------------------------------------
    async def _run(self, request: Request, adm: _Admission, job: _Job) -> Response:
        """Start the engine requests and answer; the admission is released when the response ends."""
        if adm.expired:
            raise RequestError(SHUTTING_DOWN, 503, "server_error")
        kind = "delta" if job.stream else "final"
        ids = [job.rid] if len(job.prompts) == 1 else [f"{job.rid}-{i}" for i in range(len(job.prompts))]
        adm.request_ids = ids
        start = time.time()
        gens = [self.engine.generate(p.engine_input(), job.params, rid, output_kind=kind)
                for p, rid in zip(job.prompts, ids)]
        owned = True  # until a streaming response takes the generators over

        async def close_all() -> None:
            for g in gens:
                await g.aclose()  # no-op when finished; aborts the engine request otherwise
            self._release(adm)

        try:
            # Nothing is validated until a generator first runs (the engine's own prompt checks,
            # its health), so take every first output before committing to a status code.
            firsts = await _until_disconnect(request, asyncio.gather(
                *(g.__anext__() for g in gens), return_exceptions=True))
            failures = [f for f in firsts if isinstance(f, BaseException)]
            # A dead engine first: it explains every other failure.
            failures.sort(key=lambda f: not isinstance(f, EngineDeadError))
            for failure in failures:
                err = engine_error(failure)
                raise err if err is not None else failure
            if job.stream:
                owned = False
                return _EventStream(self._events(job, adm, firsts, gens, start), close_all)
            finals = await _until_disconnect(request, asyncio.gather(
                *(_last(f, g) for f, g in zip(firsts, gens))))
            return self._final_response(job, adm, finals, start)
        except _ClientGone:
            return Response(status_code=499)  # nobody is listening; the engine requests were aborted
        except (ValueError, EngineDeadError, RequestFailedError) as e:
            err = engine_error(e)
            if err is e:
                raise
            raise err from None
        finally:
            if owned:
                await close_all()

    def _final_response(self, job: _Job, adm: _Admission, finals: list[RequestOutput], start: float) -> Response:
        for out, prompt in zip(finals, job.prompts):
            self.metrics.observe_finished(len(prompt.token_ids), [len(c.token_ids) for c in out.outputs],
                                          [c.finish_reason for c in out.outputs], out.metrics, False, start)
        if adm.expired and any(c.finish_reason == "abort" for o in finals for c in o.outputs):
            raise RequestError(SHUTTING_DOWN, 503, "server_error")
        if job.chat:
            return json_response(responses.chat_response(job.rid, self.served_model_name, finals[0],
                                                         self.tokenizer, job.num_top_logprobs))
        echo = [self._echo_text(p) for p in job.prompts] if job.echo else None
        return json_response(responses.completion_response(job.rid, self.served_model_name, finals,
                                                           self.tokenizer, job.params.n, echo, job.params.logprobs))

    def _echo_text(self, prompt: Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids) if self.tokenizer is not None else ""

    async def _events(self, job: _Job, adm: _Admission, firsts: list[RequestOutput],
                      gens: list[AsyncIterator[RequestOutput]], start: float) -> AsyncIterator[bytes]:
        """The SSE body: the prompts' delta streams interleaved as they come (choice ``i * n + j``)."""
        model, created, tok, n = self.served_model_name, int(time.time()), self.tokenizer, job.params.n
        obj = "chat.completion.chunk" if job.chat else "text_completion"
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, out: RequestOutput | None, gen: AsyncIterator[RequestOutput]) -> None:
            try:
                while out is not None:
                    await queue.put((i, out))
                    out = None if out.finished else await anext(gen, None)
                await queue.put((i, None))
            except (ValueError, EngineDeadError, RequestFailedError) as e:
                await queue.put((i, e))

        if job.chat:
            for j in range(n):
                yield _sse(responses.chat_chunk(job.rid, model, created, j, {"role": "assistant", "content": ""}))
        # Prompt logprobs arrive with each prompt's first output; each choice sends them once.
        prompt_lps = [f.prompt_logprobs for f in firsts]
        if job.echo:
            for i, p in enumerate(job.prompts):
                text = self._echo_text(p)
                echoed = None
                if job.params.logprobs is not None and prompt_lps[i] is not None:
                    echoed = (p.token_ids, prompt_lps[i])
                for j in range(n):
                    empty = CompletionOutput(j, "", [], logprobs=[] if echoed is not None else None)
                    yield _sse(responses.completion_chunk(job.rid, model, created, i * n + j, empty, tok,
                                                          prefix=text, echoed=echoed))
        pumps = [asyncio.ensure_future(pump(i, f, g)) for i, (f, g) in enumerate(zip(firsts, gens))]
        lengths = [[0] * n for _ in job.prompts]
        reasons: list[list[str | None]] = [[None] * n for _ in job.prompts]
        timing = [f.metrics for f in firsts]
        remaining, failed, last_step = len(pumps), None, None
        plp_sent: set[tuple[int, int]] = set()
        try:
            while remaining and failed is None:
                # Everything that is waiting, consecutive deltas of a prompt merged: a server
                # behind the engine writes one chunk per choice, not one per token.
                waiting = [await queue.get()]
                while not queue.empty():
                    waiting.append(queue.get_nowait())
                for i, item in _merge_waiting(waiting):
                    if failed is not None:
                        break
                    if item is None:
                        remaining -= 1
                        continue
                    if isinstance(item, BaseException):
                        failed = item
                        continue
                    now = time.time()
                    new = sum(len(c.token_ids) for c in item.outputs)
                    self.metrics.observe_tokens(now, last_step, new)
                    if new:
                        last_step = now
                    for c in item.outputs:
                        lengths[i][c.index] += len(c.token_ids)
                        if c.finish_reason is not None:
                            reasons[i][c.index] = c.finish_reason
                        plp = None
                        if not job.chat and job.params.prompt_logprobs is not None and (i, c.index) not in plp_sent:
                            plp = prompt_lps[i]
                            plp_sent.add((i, c.index))
                        for chunk in responses.delta_chunks(job.rid, model, created, i * n + c.index, c, tok,
                                                            job.chat, job.num_top_logprobs, plp):
                            yield _sse(chunk)
        finally:
            # No await in here: when the client is gone this runs inside a cancelled anyio scope,
            # where every await raises again. Cancelled pumps end on their own.
            for t in pumps:
                t.cancel()
            for i, p in enumerate(job.prompts):
                self.metrics.observe_finished(len(p.token_ids), lengths[i], reasons[i], timing[i], True, start)
        if failed is not None:
            err = engine_error(failed)
            yield _sse(error_body(str(err), err.error_type, err.status))
        elif adm.expired and any(r == "abort" for rs in reasons for r in rs):
            yield _sse(error_body(SHUTTING_DOWN, "server_error", 503))
        elif job.include_usage:
            yield _sse(responses.usage_chunk(job.rid, obj, model, created,
                                             sum(len(p.token_ids) for p in job.prompts),
                                             sum(sum(x) for x in lengths)))
        yield b"data: [DONE]\n\n"


def _merge_waiting(waiting: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """``(prompt index, delta output | exception | None)`` in arrival order, with each run of
    outputs of one prompt (nothing else of that prompt between them) merged into one."""
    merged: list[tuple[int, Any]] = []
    open_output: dict[int, int] = {}  # prompt -> position of its output that can still grow
    for i, item in waiting:
        pos = open_output.get(i)
        if isinstance(item, RequestOutput) and pos is not None:
            merged[pos] = (i, merge_outputs(merged[pos][1], item, "delta"))
            continue
        if isinstance(item, RequestOutput):
            open_output[i] = len(merged)
        else:
            open_output.pop(i, None)
        merged.append((i, item))
    return merged


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


async def _last(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> RequestOutput:
    out = first
    async for out in rest:
        pass
    return out


class _EventStream(StreamingResponse):
    """An SSE response that releases its request's resources however it ends (finished,
    client gone, server shutting down) — also when the body never started."""

    def __init__(self, events: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            await self._events.aclose()
            await self._cleanup()
