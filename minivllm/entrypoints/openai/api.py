"""The FastAPI application: routes, error envelopes, CORS and the request guard.

    GET  /health /ping           200 {} (503 when the engine core is dead or hung; no API key needed)
    GET  /v1/models /version /metrics
    POST /v1/completions /v1/chat/completions   (SSE with "stream": true)
    POST /tokenize /detokenize
    POST /v1/embeddings /classify               (pooling models: see pooling.py)

Request bodies are read and validated by the handlers themselves (``protocol.parse_request``)
rather than by FastAPI's parameter injection, so that the size limit, the read deadline and
the OpenAI-style 400 naming the field apply uniformly.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

import minivllm
from minivllm.engine.core_client import EngineDeadError
from minivllm.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from minivllm.entrypoints.openai.pooling import register_pooling_routes
from minivllm.entrypoints.openai.middleware import RequestGuard
from minivllm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    RequestError,
    TokenizeRequest,
    error_body,
    parse_request,
)
from minivllm.entrypoints.openai.serving import (
    OpenAIServing,
    engine_dead_error,
    error_response,
    json_response,
    read_body,
)

logger = logging.getLogger("minivllm.server")

_HEALTH_TIMEOUT_S = 5.0
_STATS_TIMEOUT_S = 5.0


def build_app(serving: OpenAIServing, metrics: ServerMetrics) -> FastAPI:
    """A FastAPI app over ``serving``; ``metrics`` is this server's own registry."""
    settings = serving.settings
    engine = serving.engine
    app = FastAPI(title="minivllm", version=minivllm.__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, e: RequestError) -> Response:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> Response:
        error_type = "NotFoundError" if e.status_code == 404 else "invalid_request_error"
        return json_response(error_body(str(e.detail), error_type, e.status_code), e.status_code,
                             dict(e.headers or {}))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception) -> Response:
        # The traceback goes to the log; the client learns only that it was our fault.
        logger.error("unhandled error serving %s %s", request.method, request.url.path, exc_info=e)
        return json_response(error_body("internal server error", "server_error", 500), 500)

    async def health(request: Request) -> Response:
        try:
            await asyncio.wait_for(engine.check_health(), _HEALTH_TIMEOUT_S)
        except EngineDeadError as e:
            return error_response(engine_dead_error(e))
        except Exception as e:  # a hung core, or a check that itself timed out
            logger.error("health check failed: %r", e)
            return json_response(error_body("the engine is not responding", "server_error", 503), 503)
        return json_response({})

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ping", health, methods=["GET", "POST"])

    @app.get("/version")
    async def version() -> Response:
        return json_response({"version": minivllm.__version__})

    @app.get("/v1/models")
    async def models() -> Response:
        card = {"id": serving.served_model_name, "object": "model", "created": 0, "owned_by": "minivllm",
                "root": serving.served_model_name, "max_model_len": serving.max_model_len, "permission": []}
        return json_response({"object": "list", "data": [card]})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        try:
            stats = await engine.stats(timeout_s=_STATS_TIMEOUT_S)
        except Exception:  # busy, hung or dead core: serve what we have
            stats = None
        return Response(metrics.render(stats), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serving.completions(request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await serving.chat(request)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        req: TokenizeRequest = parse_request(TokenizeRequest, await read_body(request, settings))
        serving.check_model(req.model)
        prep = serving.prompts
        if (req.prompt is None) == (req.messages is None):
            raise RequestError("give exactly one of 'prompt' and 'messages'", param="prompt")
        if req.prompt is not None:
            add_special = req.add_special_tokens if req.add_special_tokens is not None else True
            prompt = await prep.completion_prompt(req.prompt, add_special, None, None) if req.prompt else None
            ids = prompt.token_ids if prompt is not None else []
        else:
            ids = (await prep.chat_prompt(req.messages, req.add_generation_prompt, req.continue_final_message,
                                          req.chat_template_kwargs, bool(req.add_special_tokens), None,
                                          None)).token_ids if req.messages else []
        out: dict[str, Any] = {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = await prep.token_strs(ids)
        return json_response(out)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        req: DetokenizeRequest = parse_request(DetokenizeRequest, await read_body(request, settings))
        serving.check_model(req.model)
        return json_response({"prompt": await serving.prompts.decode(req.tokens)})

    register_pooling_routes(app, serving)
    app.add_middleware(RequestGuard, settings=settings, is_draining=lambda: serving.draining)
    if settings.allowed_origins:
        # Outermost, so that preflights and every error response carry the CORS headers.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False)
    return app
