"""`llmc serve`: an OpenAI-compatible HTTP server over the batching engine (Starlette + uvicorn).

Routes: `/v1/completions` and `/v1/chat/completions` (whole responses, or server-sent events
with `"stream": true`), `/v1/models`, `/health` and `/metrics` (Prometheus text). Every
refused request gets a 4xx with an OpenAI-style error object, and the server goes on. A
client that disconnects, streaming or not, has its request cancelled and its KV pages freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import AsyncIterator, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from llmc.errors import LlmcError

from .async_engine import AsyncEngine
from .engine import Engine
from .metrics import prometheus_text
from .model import CacheSettings
from .openai_protocol import ApiError, Call, Reply, error_body, parse_chat, parse_completion
from .package import Package
from .scheduler import Delta, StepFailed

KV_TOKENS_PER_SEQUENCE = 1024


def serving_cache(package: str | Path, max_batch: int, kv_tokens: int | None, step_tokens: int) -> CacheSettings:
    """Cache settings for serving; by default room for a full-context request and for
    `KV_TOKENS_PER_SEQUENCE` tokens in each sequence of a full batch, whichever is more."""
    context = int(Package.open(package).metadata["model"]["context_length"])
    return CacheSettings(max_total_tokens=kv_tokens or max(context, KV_TOKENS_PER_SEQUENCE * max_batch),
                         max_batch_size=max_batch, prefill_chunk=step_tokens)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _json_body(http: HttpRequest) -> dict:
    try:
        body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    return body


async def _events(reply: Reply, deltas: AsyncIterator[Delta]) -> AsyncIterator[str]:
    try:
        async for delta in deltas:
            for chunk in reply.chunks(delta):
                yield _sse(chunk)
        if reply.call.include_usage:
            yield _sse(reply.usage_chunk())
    except LlmcError as error:  # the model failed mid-stream: the status line is already sent
        yield _sse(error_body(str(error), "server_error"))
    yield _sse("[DONE]")


async def _collect(http: HttpRequest, reply: Reply, deltas: AsyncIterator[Delta]) -> None:
    """Gather the whole reply, or stop (cancelling the request) when the client disconnects."""
    async def gather() -> None:
        async for delta in deltas:
            reply.add(delta)

    async def disconnect() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnect())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        work.cancel()  # closes the stream of a request still running, which cancels it
    with contextlib.suppress(asyncio.CancelledError):
        await work


def create_app(engine: AsyncEngine, model_name: str) -> Starlette:
    """The ASGI app; it starts the engine's worker thread on startup and stops it on shutdown."""
    if engine.engine.tokenizer is None:
        raise LlmcError(f"the package {engine.engine.package.path} has no tokenizer, which serving needs; "
                        "recompile it with --tokenizer")
    started = int(time.time())

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name is None:
            raise ApiError("'model' is a required field", "model")
        if name != model_name:
            raise ApiError(f"The model `{name}` does not exist. This server serves `{model_name}`.", "model",
                           status=404, code="model_not_found")

    def generation(parse: Callable[[dict, AsyncEngine], Call]):
        async def endpoint(http: HttpRequest) -> Response:
            body = await _json_body(http)
            check_model(body)
            call = parse(body, engine)
            reply = Reply(call, model_name, engine.engine.tokenizer)
            deltas = engine.stream(call.request)
            if call.stream:
                return StreamingResponse(_events(reply, deltas), media_type="text/event-stream")
            await _collect(http, reply, deltas)
            return JSONResponse(reply.response())
        return endpoint

    async def models(_: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                                         "owned_by": "llmc", "max_model_len": engine.context_length}]})

    async def health(_: HttpRequest) -> Response:
        return JSONResponse({"status": "ok" if engine.alive else "engine stopped"}, 200 if engine.alive else 503)

    async def metrics(_: HttpRequest) -> Response:
        return PlainTextResponse(prometheus_text(engine.stats, engine.throughput.rate()),
                                 media_type="text/plain; version=0.0.4")

    async def api_error(_: HttpRequest, error: Exception) -> Response:
        if isinstance(error, ApiError):
            return JSONResponse(error.body(), error.status)
        if isinstance(error, HTTPException):
            kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
            return JSONResponse(error_body(str(error.detail), kind), error.status_code)
        if isinstance(error, StepFailed) or not isinstance(error, LlmcError):
            return JSONResponse(error_body(str(error), "server_error"), 500)
        return JSONResponse(error_body(str(error), "invalid_request_error"), 400)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.close()

    routes = [Route("/v1/completions", generation(parse_completion), methods=["POST"]),
              Route("/v1/chat/completions", generation(parse_chat), methods=["POST"]),
              Route("/v1/models", models), Route("/health", health), Route("/metrics", metrics)]
    handlers = {LlmcError: api_error, HTTPException: api_error, Exception: api_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


def serve(engine: Engine, model_name: str, host: str, port: int) -> None:
    """Serve until interrupted."""
    app = create_app(AsyncEngine(engine), model_name)
    uvicorn.run(app, host=host, port=port, log_level="info")
