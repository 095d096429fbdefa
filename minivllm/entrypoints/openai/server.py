"""OpenAI-compatible HTTP server over ``AsyncLLM`` (standard library only).

    GET  /health                → 200 {} (503 once the engine core is dead)
    GET  /v1/models             → the served model
    POST /v1/completions        → text completion, optionally streamed (SSE)
    POST /v1/chat/completions   → chat completion, optionally streamed (SSE)

One connection carries one request (``Connection: close``). While a completion runs, the
server also watches the socket: when the client goes away the handler task is cancelled,
which makes ``AsyncLLM``'s generator abort the request and free its KV blocks. A bad request
is answered with 4xx and touches nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from minivllm.engine.async_llm import AsyncLLM, EngineDeadError
from minivllm.entrypoints.openai import protocol
from minivllm.entrypoints.openai.http import (
    HTTPError,
    HTTPRequest,
    read_request,
    start_event_stream,
    write_event,
    write_json,
)
from minivllm.entrypoints.openai.protocol import ParsedRequest, RequestError, error_body
from minivllm.outputs import CompletionOutput, RequestOutput

logger = logging.getLogger(__name__)

Handler = Callable[[HTTPRequest, asyncio.StreamWriter], Awaitable[None]]


class OpenAIServer:
    """Serves one ``AsyncLLM`` under one model name. Runs on the caller's event loop."""

    def __init__(self, engine: AsyncLLM, served_model_name: str) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._routes: dict[str, dict[str, Handler]] = {
            "/health": {"GET": self._health},
            "/v1/models": {"GET": self._models},
            "/v1/completions": {"POST": self._completions},
            "/v1/chat/completions": {"POST": self._chat},
        }

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 8000) -> tuple[str, int]:
        """Listen on ``host:port`` (port 0: any free port); returns the bound address."""
        self._server = await asyncio.start_server(self._on_connection, host, port)
        bound = self._server.sockets[0].getsockname()
        return bound[0], bound[1]

    async def serve_forever(self) -> None:
        if self._server is None:
            raise RuntimeError("call start() first")
        await self._server.serve_forever()

    async def close(self) -> None:
        """Stop listening and cancel in-flight requests (their engine requests are aborted)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # ---- one connection -----------------------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self._serve_one(reader, writer)
        except asyncio.CancelledError:
            pass  # client gone or server closing; the engine request was aborted on the way out
        except ConnectionError:
            pass
        except Exception:  # a bug in a handler must not take the server down
            logger.exception("unhandled error while serving a request")
            with contextlib.suppress(Exception):
                await write_json(writer, 500, error_body("internal server error", "server_error", 500))
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_request(reader)
        except HTTPError as e:
            await write_json(writer, e.status, error_body(e.message, code=e.status))
            return
        methods = self._routes.get(request.path)
        if methods is None:
            await write_json(writer, 404, error_body(f"no route {request.path}", "NotFoundError", 404))
            return
        handler = methods.get(request.method)
        if handler is None:
            await write_json(writer, 405, error_body(f"method {request.method} not allowed on "
                                                     f"{request.path}", code=405),
                             {"Allow": ", ".join(methods)})
            return
        await _until_disconnect(handler(request, writer), reader)

    # ---- endpoints ------------------------------------------------------------------------------
    async def _health(self, request: HTTPRequest, writer: asyncio.StreamWriter) -> None:
        try:
            await self.engine.check_health()
        except EngineDeadError as e:
            await write_json(writer, 503, error_body(f"engine is dead: {e}", "server_error", 503))
            return
        await write_json(writer, 200, {})

    async def _models(self, request: HTTPRequest, writer: asyncio.StreamWriter) -> None:
        model = {"id": self.served_model_name, "object": "model", "created": 0, "owned_by": "minivllm",
                 "max_model_len": self.engine.max_model_len}
        await write_json(writer, 200, {"object": "list", "data": [model]})

    async def _completions(self, request: HTTPRequest, writer: asyncio.StreamWriter) -> None:
        await self._run(request, writer, chat=False)

    async def _chat(self, request: HTTPRequest, writer: asyncio.StreamWriter) -> None:
        await self._run(request, writer, chat=True)

    # ---- generation ---------------------------------------------------------------------------
    async def _run(self, request: HTTPRequest, writer: asyncio.StreamWriter, chat: bool) -> None:
        try:
            body = protocol.parse_json_body(request.body)
            parsed = protocol.parse_chat_request(body) if chat else protocol.parse_completion_request(body)
            model = body.get("model")
            if model is not None and model != self.served_model_name:
                raise RequestError(f"model {model!r} does not exist; this server serves "
                                   f"{self.served_model_name!r}", 404, "NotFoundError", "model")
        except RequestError as e:
            await write_json(writer, e.status, error_body(str(e), e.error_type, e.status, e.param))
            return
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        if parsed.prompts is not None:
            await self._run_batch(rid, parsed, writer)
            return
        kind = "delta" if parsed.stream else "final"
        if chat:
            outputs = self.engine.chat(parsed.messages, parsed.params, rid, output_kind=kind)
        else:
            outputs = self.engine.generate(parsed.prompt, parsed.params, rid, output_kind=kind)
        try:
            # Nothing is validated until the generator first runs (prompt length, chat template,
            # engine health), so take the first output before committing to a status code.
            try:
                first = await outputs.__anext__()
            except ValueError as e:
                await write_json(writer, 400, error_body(str(e)))
                return
            except EngineDeadError as e:
                await write_json(writer, 503, error_body(f"engine is dead: {e}", "server_error", 503))
                return
            if parsed.stream:
                await self._stream(rid, chat, parsed, first, outputs, writer)
            else:
                final = first
                async for final in outputs:
                    pass
                tok = self.engine.tokenizer
                payload = (protocol.chat_response(rid, self.served_model_name, final, tok,
                                                  parsed.chat_logprobs) if chat else
                           protocol.completion_response(rid, self.served_model_name, final, tok))
                await write_json(writer, 200, payload)
        finally:
            await outputs.aclose()  # no-op when finished; aborts the request otherwise

    async def _run_batch(self, rid: str, parsed: ParsedRequest, writer: asyncio.StreamWriter) -> None:
        """``/v1/completions`` with a list of prompts: one engine request per prompt, all at once."""
        kind = "delta" if parsed.stream else "final"
        gens = [self.engine.generate(p, parsed.params, f"{rid}-{i}", output_kind=kind)
                for i, p in enumerate(parsed.prompts)]
        try:
            # As for one prompt: every prompt is validated (first output) before the status code.
            firsts = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
            for first in firsts:
                if isinstance(first, EngineDeadError):
                    await write_json(writer, 503, error_body(f"engine is dead: {first}", "server_error", 503))
                    return
                if isinstance(first, ValueError):
                    await write_json(writer, 400, error_body(str(first)))
                    return
                if isinstance(first, BaseException):
                    raise first
            if parsed.stream:
                await self._stream_batch(rid, parsed, firsts, gens, writer)
            else:
                finals = await asyncio.gather(*(_last_output(f, g) for f, g in zip(firsts, gens)))
                await write_json(writer, 200, protocol.completion_batch_response(
                    rid, self.served_model_name, finals, self.engine.tokenizer, parsed.params.n))
        finally:
            for g in gens:
                await g.aclose()  # no-op when finished; aborts the request otherwise

    async def _stream_batch(self, rid: str, parsed: ParsedRequest, firsts: list[RequestOutput],
                            gens: list[AsyncIterator[RequestOutput]], writer: asyncio.StreamWriter) -> None:
        """Interleave the prompts' delta streams as they come; choice index ``i * n + j``."""
        model, created, tok, n = self.served_model_name, int(time.time()), self.engine.tokenizer, parsed.params.n
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, out: RequestOutput | None, gen: AsyncIterator[RequestOutput]) -> None:
            try:
                while out is not None:
                    await queue.put((i, out))
                    out = None if out.finished else await anext(gen, None)
                await queue.put((i, None))
            except (ValueError, EngineDeadError) as e:
                await queue.put((i, e))

        await start_event_stream(writer)
        pumps = [asyncio.ensure_future(pump(i, f, g)) for i, (f, g) in enumerate(zip(firsts, gens))]
        remaining, num_completion_tokens, failed = len(pumps), 0, None
        try:
            while remaining and failed is None:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    failed = item
                else:
                    num_completion_tokens += sum(len(c.token_ids) for c in item.outputs)
                    for c in item.outputs:
                        c = dataclasses.replace(c, index=i * n + c.index)
                        for chunk in _delta_chunks(rid, model, created, c, tok, False, False):
                            await write_event(writer, chunk)
        finally:
            for t in pumps:
                t.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        if failed is not None:
            await write_event(writer, error_body(str(failed), "server_error" if isinstance(
                failed, EngineDeadError) else "invalid_request_error", 500))
        elif parsed.include_usage:
            await write_event(writer, protocol.usage_chunk(
                rid, "text_completion", model, created,
                sum(len(f.prompt_token_ids) for f in firsts), num_completion_tokens))
        await write_event(writer, "[DONE]")

    async def _stream(self, rid: str, chat: bool, parsed: ParsedRequest, first: RequestOutput,
                      rest: AsyncIterator[RequestOutput], writer: asyncio.StreamWriter) -> None:
        model, created, tok = self.served_model_name, int(time.time()), self.engine.tokenizer
        await start_event_stream(writer)
        if chat:
            for i in range(parsed.params.n):
                await write_event(writer, protocol.chat_chunk(rid, model, created, i,
                                                              {"role": "assistant", "content": ""}))
        finished: set[int] = set()
        num_completion_tokens = 0
        out: RequestOutput | None = first
        try:
            while out is not None:
                num_completion_tokens += sum(len(c.token_ids) for c in out.outputs)
                for c in out.outputs:
                    if c.index in finished:
                        continue
                    for chunk in _delta_chunks(rid, model, created, c, tok, chat, parsed.chat_logprobs):
                        await write_event(writer, chunk)
                    if c.finish_reason is not None:
                        finished.add(c.index)
                out = await anext(rest, None)
        except (ValueError, EngineDeadError) as e:  # the request failed after the stream began
            await write_event(writer, error_body(str(e), "server_error" if isinstance(
                e, EngineDeadError) else "invalid_request_error", 500))
        else:
            if parsed.include_usage:
                await write_event(writer, protocol.usage_chunk(
                    rid, "chat.completion.chunk" if chat else "text_completion", model, created,
                    len(first.prompt_token_ids), num_completion_tokens))
        await write_event(writer, "[DONE]")


async def _last_output(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> RequestOutput:
    out = first
    async for out in rest:
        pass
    return out


def _delta_chunks(rid: str, model: str, created: int, c: CompletionOutput, tok: Any, chat: bool,
                  chat_logprobs: bool) -> list[dict[str, Any]]:
    """The SSE chunks for one completion's delta (none while text is held back)."""
    has_new = bool(c.text) or (c.logprobs is not None and bool(c.token_ids))
    if not chat:
        if has_new or c.finish_reason is not None:
            return [protocol.completion_chunk(rid, model, created, c, tok)]
        return []
    chunks = []
    if has_new:
        lps = protocol.chat_logprobs(c, tok) if chat_logprobs else None
        chunks.append(protocol.chat_chunk(rid, model, created, c.index, {"content": c.text}, None, lps))
    if c.finish_reason is not None:
        chunks.append(protocol.chat_chunk(rid, model, created, c.index, {}, c.finish_reason))
    return chunks


async def _until_disconnect(work: Awaitable[None], reader: asyncio.StreamReader) -> None:
    """Run ``work``; cancel it if the client closes its end first.

    The request has been read completely and we answer with ``Connection: close``, so
    anything more on the socket is ignored and EOF means the client gave up.
    """
    async def wait_eof() -> None:
        while await reader.read(4096):
            pass

    work_task = asyncio.ensure_future(work)
    eof_task = asyncio.ensure_future(wait_eof())
    try:
        await asyncio.wait({work_task, eof_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Cancelling an already-finished task is a no-op; on our own cancellation both go.
        for t in (work_task, eof_task):
            t.cancel()
        await asyncio.gather(work_task, eof_task, return_exceptions=True)
    if not work_task.cancelled() and work_task.exception() is not None:
        raise work_task.exception()


async def serve(engine: AsyncLLM, served_model_name: str, host: str = "127.0.0.1",
                port: int = 8000) -> None:
    """Run the server until cancelled (Ctrl-C)."""
    server = OpenAIServer(engine, served_model_name)
    bound_host, bound_port = await server.start(host, port)
    print(f"minivllm: serving {served_model_name!r} on http://{bound_host}:{bound_port}", flush=True)
    try:
        await server.serve_forever()
    finally:
        await server.close()
