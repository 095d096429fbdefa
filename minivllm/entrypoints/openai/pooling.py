"""The pooling endpoints: ``POST /v1/embeddings`` (OpenAI's shape) and ``POST /classify`` (vLLM's).

    /v1/embeddings  {"input": str | [str] | [int] | [[int]], "encoding_format": "float" | "base64",
                     "truncate_prompt_tokens": k}  → {"object": "list", "data": [{"object":
                     "embedding", "index", "embedding"}], "model", "usage"}
    /classify       {"input": ...}  → {"id", "object": "list", "created", "model", "data":
                     [{"index", "label", "probs", "num_classes"}], "usage"}

Both share the generation endpoints' admission (concurrency limit, drain), body limits and
error envelopes; the engine's own checks (task, token ids, prompt length) become 400s. A client
that disconnects has its requests aborted.
"""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from minivllm.engine.core_client import EngineDeadError
from minivllm.engine.stream import RequestFailedError
from minivllm.entrypoints.openai.protocol import (
    INT64_MAX,
    PositiveInt64,
    RequestError,
    new_id,
    parse_request,
)
from minivllm.entrypoints.openai.serving import (
    OpenAIServing,
    _ClientGone,
    _until_disconnect,
    engine_error,
    json_response,
    read_body,
)
from minivllm.pooling_params import PoolingParams


class _PoolingRequest(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str | None = None
    input: Any = None
    user: str | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None


class EmbeddingRequest(_PoolingRequest):
    """``POST /v1/embeddings``."""

    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt64 | None = None


class ClassificationRequest(_PoolingRequest):
    """``POST /classify``."""


def request_inputs(value: Any) -> list[str | list[int]]:
    """``input`` as a list of prompts (text or token ids), validated in shape."""
    if value is None:
        raise RequestError("missing required field 'input'", param="input")
    items = list(value) if isinstance(value, list) and value and all(
        isinstance(x, (str, list)) for x in value) else [value]
    for x in items:
        ok = (isinstance(x, str) and x) or (isinstance(x, list) and x and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x))
        if not ok:
            raise RequestError("input must be a non-empty string, a list of token ids, or a list of "
                               "either (a batch)", param="input")
    return items


async def _pool(serving: OpenAIServing, request: Request, req: _PoolingRequest, task: str) -> list[Any]:
    """Admit, run ``task`` on the request's inputs, and return the engine's outputs."""
    serving.check_model(req.model)
    inputs = request_inputs(req.input)
    if len(inputs) > serving.settings.max_prompts_per_request:
        raise RequestError(f"at most {serving.settings.max_prompts_per_request} inputs per request on this "
                           f"server (--max-prompts-per-request), got {len(inputs)}", param="input")
    for x in inputs:
        if isinstance(x, str):
            serving.prompts.check_chars(len(x), "input")
    try:
        params = PoolingParams(truncate_prompt_tokens=req.truncate_prompt_tokens)
    except ValueError as e:
        raise RequestError(str(e), param="truncate_prompt_tokens") from None
    run = serving.engine.classify if task == "classify" else serving.engine.embed
    adm = serving._admit()
    try:
        return await _until_disconnect(request, run(inputs, params))
    except (ValueError, EngineDeadError, RequestFailedError) as e:
        raise engine_error(e) from None
    finally:
        serving._release(adm)


def _usage(outs: list[Any]) -> dict[str, Any]:
    n = sum(len(o.prompt_token_ids) for o in outs)
    return {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0, "prompt_tokens_details": None}


def register_pooling_routes(app: FastAPI, serving: OpenAIServing) -> None:
    """Add ``/v1/embeddings`` and ``/classify`` to ``app``."""

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        req: EmbeddingRequest = parse_request(EmbeddingRequest, await read_body(request, serving.settings))
        if req.dimensions is not None:
            raise RequestError("dimensions is not supported (the model's full embedding is returned)",
                               param="dimensions")
        try:
            outs = await _pool(serving, request, req, "embed")
        except _ClientGone:
            return Response(status_code=499)
        data = []
        for i, o in enumerate(outs):
            emb: Any = o.outputs.embedding
            if req.encoding_format == "base64":  # little-endian float32, as OpenAI sends it
                emb = base64.b64encode(np.asarray(emb, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return json_response({"id": new_id("embd"), "object": "list", "created": int(time.time()),
                              "model": serving.served_model_name, "data": data, "usage": _usage(outs)})

    @app.post("/classify")
    async def classify(request: Request) -> Response:
        req: ClassificationRequest = parse_request(ClassificationRequest,
                                                   await read_body(request, serving.settings))
        try:
            outs = await _pool(serving, request, req, "classify")
        except _ClientGone:
            return Response(status_code=499)
        data = [{"index": i, "label": o.outputs.label, "probs": o.outputs.probs,
                 "num_classes": o.outputs.num_classes} for i, o in enumerate(outs)]
        return json_response({"id": new_id("classify"), "object": "list", "created": int(time.time()),
                              "model": serving.served_model_name, "data": data, "usage": _usage(outs)})
