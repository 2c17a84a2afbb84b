"""The Starlette application: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus /health and
/metrics. Request bodies are read up to a size limit and checked (schema.py), generations run one at a time
on the worker (worker.py), and a client that goes away, while its request waits or while it streams,
cancels its generation."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from . import schema
from .errors import APIError
from .metrics import Metrics
from .responses import CHAT, COMPLETION, Answer, Endpoint, event
from .worker import CLIENT_GONE, Job, Worker

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 1024  # per request; also the default when a request names none
    max_request_bytes: int = 1 << 20
    max_queue: int = 64


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class EventStream(StreamingResponse):
    """Server-sent events whose generation is cancelled however the response ends (a client that
    disconnects mid-stream ends it early); for a finished generation that is a no-op."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], job: Job) -> None:
        super().__init__(content, headers={"cache-control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel(CLIENT_GONE)


def create_app(lm, model_name: str, limits: Limits = Limits(), speculative: bool = False) -> Starlette:
    """The app serving `lm` (a loaded MoEModel) as `model_name`, every generation with MTP speculative decoding
    when `speculative`; its worker thread starts here and stops with the app (app.state.worker.close() stops it
    earlier, as offload-serve does on SIGINT/SIGTERM)."""
    metrics = Metrics()
    worker = Worker(lm, metrics, limits.max_queue)
    started = int(time.time())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_name})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": started, "owned_by": "moe-offload"}]})

    def prometheus(request: Request) -> Response:  # sync: MoEModel.stats() waits for the current token
        text = metrics.render(worker.queued, worker.running, lm.stats())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def generate(request: Request, endpoint: Endpoint) -> Response:
        body = await _read_body(request, limits.max_request_bytes)
        parsed = schema.parse(body, endpoint.request, limits.max_tokens)
        options = parsed.options(limits.max_tokens) | {"speculative": "mtp" if speculative else None}
        job = Job(parsed.prompt(), options)
        worker.submit(job)
        answer = Answer(endpoint, model_name)
        pieces = job.pieces()
        try:
            if not parsed.stream:
                text = await _unless_disconnected(request, _join(pieces))
                return JSONResponse(answer.whole(text, job.reply))
            # errors found before the first piece (a prompt past the context) are still an HTTP status
            first = await _unless_disconnected(request, anext(pieces, None))
        except ClientGone:
            job.cancel(CLIENT_GONE)
            return Response()  # nobody reads it
        return EventStream(_stream(answer, job, first, pieces, parsed.include_usage), job)

    async def chat(request: Request) -> Response:
        return await generate(request, CHAT)

    async def completions(request: Request) -> Response:
        return await generate(request, COMPLETION)

    routes = [Route("/health", health), Route("/v1/models", models), Route("/metrics", prometheus),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _internal_error}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        worker.close()
        await run_in_threadpool(worker.join)

    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.worker = worker
    return app


async def _stream(answer: Answer, job: Job, first: str | None, pieces: AsyncIterator[str],
                  include_usage: bool) -> AsyncIterator[str]:
    """The answer's events: the pieces as they come, the finish reason, the usage when asked, [DONE]. A
    generation the server stopped (shutdown) ends with an error event, as OpenAI's streams report errors."""
    endpoint = answer.endpoint
    try:
        if endpoint.chat:
            yield answer.chunk([endpoint.delta("", first=True)])
        if first is not None:
            yield answer.chunk([endpoint.delta(first)])
            async for piece in pieces:
                yield answer.chunk([endpoint.delta(piece)])
        yield answer.chunk([endpoint.delta("", job.reply.finish_reason)])
        if include_usage:
            yield answer.chunk([], job.reply)
    except APIError as e:
        yield event(e.body())
    yield event("[DONE]")


async def _join(pieces: AsyncIterator[str]) -> str:
    return "".join([piece async for piece in pieces])


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone (and `work` cancelled) when the client disconnects first."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()  # its generation is cancelled as the job's `pieces` unwinds
    if task not in done:
        raise ClientGone
    return task.result()


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: nothing else arrives before that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 once it is known to pass `limit` bytes (by its Content-Length or while reading)."""
    too_large = APIError(413, f"the request body is larger than {limit} bytes (offload-serve "
                         "--max-request-bytes raises the limit)", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _api_error(request: Request, error: APIError) -> Response:
    return JSONResponse(error.body(), status_code=error.status)


async def _http_error(request: Request, error: HTTPException) -> Response:
    """Starlette's own 404/405, in OpenAI's error body."""
    return await _api_error(request, APIError(error.status_code, f"{request.method} {request.url.path}: "
                                              f"{error.detail}"))


async def _internal_error(request: Request, error: Exception) -> Response:
    return await _api_error(request, APIError(500, f"internal error: {type(error).__name__}: {error}"))
