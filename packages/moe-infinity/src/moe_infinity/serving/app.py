"""The OpenAI-compatible HTTP front end (FastAPI): routes, authentication, request counting.

`create_app` binds the routes to an `Engine`; the app holds no model state of its own. Every
refusal is an OpenAI-shaped 4xx (`api_errors.py`): a body that is not JSON, not an object, of
the wrong content type, too large, with a wrong type or an out-of-range value, a prompt longer
than the context (400), a full queue (429 with `Retry-After`), a missing or wrong API key (401),
a server shutting down (503). A streaming client that disconnects has its request cancelled.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from moe_core import RequestError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moe_infinity.serving.api_errors import (
    ApiError,
    error_response,
    install_error_handlers,
    validation_message,
)
from moe_infinity.serving.engine import Engine, QueueFullError, ShuttingDownError
from moe_infinity.serving.event_channel import EventChannel
from moe_infinity.serving.openai_responses import ResponseMaker
from moe_infinity.serving.openai_schema import ChatCompletionBody, CompletionBody
from moe_infinity.serving.request import GenerationRequest, TokenLogprob
from moe_infinity.serving.request_builder import RequestLimits, chat_request, completion_request
from moe_infinity.serving.serving_metrics import CONTENT_TYPE, ServingMetrics

__all__ = ["MAX_BODY_BYTES", "create_app"]

MAX_BODY_BYTES = 16 << 20
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
_DISCONNECT_POLL_S = 0.5
_Body = TypeVar("_Body", bound=BaseModel)


def _sse(obj: object) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _endpoint(path: str) -> str:
    """The metric label of a path (unknown paths share one label)."""
    if path.startswith("/v1/models"):
        return "/v1/models"
    return path if path in _ENDPOINTS else "other"


async def _json_body(request: Request, model: type[_Body]) -> _Body:
    """The request's body parsed as JSON and validated as `model`."""
    kind = request.headers.get("content-type", "")
    if "application/json" not in kind.lower():
        raise ApiError(415, f"the body must be JSON (Content-Type: application/json), got "
                       f"{kind or 'no content type'!r}", code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body exceeds {MAX_BODY_BYTES} bytes", code="body_too_large")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body exceeds {MAX_BODY_BYTES} bytes", code="body_too_large")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise ApiError(400, message, param=param, code="invalid_value") from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply", code="invalid_json") from None


def create_app(engine: Engine, model_name: str, metrics: ServingMetrics,
               api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under the name `model_name`."""
    app = FastAPI(title="moe-infinity", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    served = engine.served
    tokenizer = served.tokenizer
    limits = RequestLimits(served.model.spec.vocab_size, engine.max_request_tokens,
                           engine.context_tokens)
    created = int(time.time())

    app.add_middleware(_Guard, metrics=metrics, api_key=api_key)

    @app.get("/health")
    async def health() -> JSONResponse:
        snap = engine.snapshot()
        status = 200 if engine.is_alive else 503
        return JSONResponse({"status": "ok" if status == 200 else "engine stopped",
                             "running": snap.running, "queued": snap.queued},
                            status_code=status)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def _model_card() -> dict[str, object]:
        return {"id": model_name, "object": "model", "created": created,
                "owned_by": "moe-infinity", "max_model_len": engine.context_tokens}

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_model_card()]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> JSONResponse:
        if name != model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves "
                           f"{model_name!r}", param="model", code="model_not_found")
        return JSONResponse(_model_card())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _json_body(request, CompletionBody)
        _check_model(body.model, model_name)
        rid = f"cmpl-{uuid.uuid4().hex}"
        gen = completion_request(body, rid, tokenizer, limits)
        return await _serve(request, gen, body.stream or False, _include_usage(body), False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _json_body(request, ChatCompletionBody)
        _check_model(body.model, model_name)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = chat_request(body, rid, tokenizer, limits)
        return await _serve(request, gen, body.stream or False, _include_usage(body), True)

    async def _serve(request: Request, gen: GenerationRequest, stream: bool,
                     include_usage: bool, chat: bool) -> Response:
        channel = EventChannel(asyncio.get_running_loop())
        _submit(engine, gen, channel)
        maker = ResponseMaker(gen.request_id, model_name, int(time.time()), chat,
                              lambda i: served.decode([i]))
        if stream:
            return StreamingResponse(_stream(engine, gen, channel, maker, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _whole(request, engine, gen, channel, maker)

    return app


class _Guard:
    """Pure ASGI middleware (streams pass through untouched): the API key on /v1/*, and every
    response counted by endpoint and status."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics, api_key: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = _endpoint(path)
        if self.api_key is not None and path.startswith("/v1/") and \
                not _authorised(Headers(scope=scope).get("authorization", ""), self.api_key):
            refusal = error_response(401, "a valid API key is needed: send Authorization: "
                                     "Bearer <key>", code="invalid_api_key")
            self.metrics.on_http(endpoint, 401)
            await refusal(scope, receive, send)
            return
        status = [500]

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.metrics.on_http(endpoint, status[0])


def _authorised(header: str, api_key: str) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              api_key.encode())


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise ApiError(404, f"model {name!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


def _include_usage(body: CompletionBody | ChatCompletionBody) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _submit(engine: Engine, gen: GenerationRequest, channel: EventChannel) -> None:
    try:
        engine.submit(gen, channel.sink)
    except QueueFullError as exc:
        raise ApiError(429, str(exc), code="queue_full", headers={"Retry-After": "1"}) from None
    except ShuttingDownError as exc:
        raise ApiError(503, str(exc), code="shutting_down") from None
    except RequestError as exc:
        raise ApiError(400, str(exc), code="context_length_exceeded") from None


async def _stream(engine: Engine, gen: GenerationRequest, channel: EventChannel,
                  maker: ResponseMaker, include_usage: bool) -> AsyncIterator[str]:
    try:
        first = maker.first_chunk()
        if first is not None:
            yield _sse(first)
        while True:
            event = await channel.next_event()
            if event is None:
                continue
            if event.error is not None:
                yield _sse({"error": {"message": event.error, "type": "server_error",
                                      "param": None, "code": "internal_error"}})
                break
            chunk = maker.chunk(event)
            if chunk is not None:
                yield _sse(chunk)
            if event.finish_reason is not None:
                if include_usage:
                    yield _sse(maker.usage_chunk(event))
                break
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the task was cancelled) or the stream ended
        if not channel.finished:
            engine.cancel(gen.request_id)


async def _whole(request: Request, engine: Engine, gen: GenerationRequest,
                 channel: EventChannel, maker: ResponseMaker) -> Response:
    texts: list[str] = []
    logprobs: list[TokenLogprob] | None = [] if gen.logprobs is not None else None
    try:
        while True:
            event = await channel.next_event(_DISCONNECT_POLL_S)
            if event is None:
                if await request.is_disconnected():
                    engine.cancel(gen.request_id)
                    return Response(status_code=499)
                continue
            if event.error is not None:
                return error_response(500, event.error, code="internal_error")
            texts.append(event.text)
            if logprobs is not None and event.logprobs:
                logprobs.extend(event.logprobs)
            if event.finish_reason is not None:
                return JSONResponse(maker.response("".join(texts), event, logprobs))
    finally:
        if not channel.finished:
            engine.cancel(gen.request_id)
