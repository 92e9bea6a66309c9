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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import AsyncIterator, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from llmc.errors import LlmcError

from .async_engine import AsyncEngine, EngineStopped
from .engine import Engine
from .metrics import prometheus_text
from .model import CacheSettings
from .openai_protocol import ApiError, Call, Reply, error_body, parse_chat, parse_completion
from .package import Package
from .scheduler import Delta, RequestFailed, StepFailed

KV_TOKENS_PER_SEQUENCE = 1024


def serving_cache(package: str | Path, max_batch: int, kv_tokens: int | None, step_tokens: int,
                  prefix_cache: bool = True) -> CacheSettings:
    """Cache settings for serving; by default room for a full-context request and for
    `KV_TOKENS_PER_SEQUENCE` tokens in each sequence of a full batch, whichever is more."""
    context = int(Package.open(package).metadata["model"]["context_length"])
    return CacheSettings(max_total_tokens=kv_tokens or max(context, KV_TOKENS_PER_SEQUENCE * max_batch),
                         max_batch_size=max_batch, prefill_chunk=step_tokens, prefix_cache=prefix_cache)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@dataclass(frozen=True)
class ServerLimits:
    """What one request may cost the server before it is refused, and how long shutdown waits."""

    max_body_bytes: int = 4 * 2**20
    body_timeout_s: float = 30.0
    shutdown_timeout_s: float = 10.0


async def _read_body(http: HttpRequest, limits: ServerLimits) -> bytes:
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise ApiError(f"the request body has {declared} bytes; this server takes at most {limits.max_body_bytes}",
                       status=413, code="request_too_large")
    parts, size = [], 0
    async for part in http.stream():
        size += len(part)
        if size > limits.max_body_bytes:
            raise ApiError(f"the request body is over {limits.max_body_bytes} bytes, the most this server takes",
                           status=413, code="request_too_large")
        parts.append(part)
    return b"".join(parts)


async def _json_body(http: HttpRequest, limits: ServerLimits) -> dict:
    try:
        raw = await asyncio.wait_for(_read_body(http, limits), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(f"the request body did not arrive within {limits.body_timeout_s:g} s", status=408,
                       code="request_timeout") from None
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ApiError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    return body


async def _events(reply: Reply, deltas: AsyncIterator[tuple[int, Delta]]) -> AsyncIterator[str]:
    try:
        async for index, delta in deltas:
            for chunk in reply.chunks(index, delta):
                yield _sse(chunk)
        if reply.call.include_usage:
            yield _sse(reply.usage_chunk())
    except Exception as error:  # the model failed mid-stream: the status line is already sent
        yield _sse(error_body(str(error), "server_error"))
    yield _sse("[DONE]")


async def _collect(http: HttpRequest, reply: Reply, deltas: AsyncIterator[tuple[int, Delta]]) -> None:
    """Gather the whole reply, or stop (cancelling the requests) when the client disconnects."""
    async def gather() -> None:
        async for index, delta in deltas:
            reply.add(index, delta)

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


def create_app(engine: AsyncEngine, model_name: str, limits: ServerLimits = ServerLimits()) -> Starlette:
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
            body = await _json_body(http, limits)
            check_model(body)
            # Tokenizing and rendering the template can take a while for a long prompt: not on the event loop.
            call = await asyncio.to_thread(parse, body, engine)
            reply = Reply(call, model_name, engine.engine.tokenizer)
            deltas = engine.stream(call.requests)
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
        if isinstance(error, EngineStopped):
            return JSONResponse(error_body(str(error), "server_error"), 503)
        if isinstance(error, (StepFailed, RequestFailed)) or not isinstance(error, LlmcError):
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


class _Server(uvicorn.Server):
    """uvicorn, whose shutdown ends the streams still open at the deadline with an error event."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout_s: float):
        super().__init__(config)
        self.engine = engine
        self.deadline = threading.Timer(shutdown_timeout_s, engine.abort_all,
                                        ("the server is shutting down; the request was ended",))
        self.deadline.daemon = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            self.deadline.start()
        super().handle_exit(sig, frame)


def serve(engine: Engine, model_name: str, host: str, port: int, limits: ServerLimits = ServerLimits()) -> None:
    """Serve until interrupted (SIGINT or SIGTERM: new connections are refused, open streams get
    `limits.shutdown_timeout_s` to finish). If the engine dies, the server stops and this raises,
    so that the process exits non-zero and a supervisor restarts it."""
    def stop(_: BaseException) -> None:
        server.should_exit = True

    async_engine = AsyncEngine(engine, on_stop=stop)
    config = uvicorn.Config(create_app(async_engine, model_name, limits), host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=limits.shutdown_timeout_s + 5)
    server = _Server(config, async_engine, limits.shutdown_timeout_s)
    server.run()
    server.deadline.cancel()
    if async_engine.failure is not None:
        raise LlmcError(f"the engine stopped ({type(async_engine.failure).__name__}: {async_engine.failure}); "
                        "the server exits so that it can be restarted")
