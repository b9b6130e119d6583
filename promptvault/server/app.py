"""The HTTP routes: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, Anthropic's
/v1/messages, /health, and the cache's /v1/cache/stats and DELETE /v1/cache.

Handlers parse and tokenize on the event loop (no MLX there), hand the generation to the
worker and relay its events, whole or as server-sent events. Every error is JSON in the API's
own shape (OpenAI's `{"error": {message, type, param, code}}`; Anthropic's on /v1/messages) with
the status a client expects. With an API key set, /v1 routes need it as `Authorization: Bearer
KEY` (OpenAI clients) or `x-api-key: KEY` (Anthropic clients), compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from promptvault.server import prefix_cache
from promptvault.server import parse
from promptvault.server.responses import AnthropicShape, OpenAIShape, anthropic_error_body, error_body, event, sse
from promptvault.server.worker import Busy, Worker
from promptvault.vault.errors import VaultSettingsError

ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                    503: "overloaded_error", 500: "api_error"}


def create_app(worker: Worker, limits: parse.Limits, served_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="promptvault", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = worker.lm.tokenizer
    created = int(time.time())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if not hmac.compare_digest((given or "").encode(), api_key.encode()):
            raise parse.RequestError(401, "missing or wrong API key" if given else "missing API key",
                                     code="invalid_api_key", kind="authentication_error")

    def error(request: Request, status: int, message: str, kind: str, param=None, code=None) -> JSONResponse:
        if request.url.path == "/v1/messages":
            return JSONResponse(anthropic_error_body(message, ANTHROPIC_ERRORS.get(status, kind)), status_code=status)
        return JSONResponse(error_body(message, kind, param, code), status_code=status)

    @app.exception_handler(parse.RequestError)
    async def _request_error(request: Request, e: parse.RequestError):
        return error(request, e.status, e.message, e.kind, e.param, e.code)

    @app.exception_handler(Busy)
    async def _busy(request: Request, e: Busy):
        return error(request, 503, str(e), "server_error", code="queue_full")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error(request, e.status_code, str(e.detail), "invalid_request_error")

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise parse.RequestError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise parse.RequestError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    @app.get("/health")
    async def health():
        ok = worker.alive()
        return JSONResponse({"status": "ok" if ok else "unavailable", "queued": worker.queued()},
                            status_code=200 if ok else 503)

    v1 = [Depends(check_key)]

    @app.get("/v1/models", dependencies=v1)
    async def models():
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": created,
                                            "owned_by": "promptvault"}]}

    @app.get("/v1/cache/stats", dependencies=v1)
    async def cache_stats():
        return await worker.run(lambda: prefix_cache.stats(worker.vault, worker.live))

    @app.delete("/v1/cache", dependencies=v1)
    async def cache_clear(label: str | None = None):
        try:
            removed = await worker.run(lambda: prefix_cache.clear(worker.vault, worker.live, label))
        except VaultSettingsError as e:
            raise parse.RequestError(404, str(e), param="label", code="label_not_found") from None
        return {"removed_chunks": removed}

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(request: Request):
        p = parse.chat(await body_of(request), tokenizer, limits)
        return await _openai(worker, p, OpenAIShape(p.model, chat=True))

    @app.post("/v1/completions", dependencies=v1)
    async def completions(request: Request):
        p = parse.completion(await body_of(request), tokenizer, limits)
        return await _openai(worker, p, OpenAIShape(p.model, chat=False))

    @app.post("/v1/messages", dependencies=v1)
    async def messages(request: Request):
        p = parse.messages(await body_of(request), tokenizer, limits)
        shape = AnthropicShape(p.model)
        events = _start(worker, p)
        if not p.stream:
            text, done = await _collect(p, events)
            return shape.whole(text, done)

        async def stream():
            try:
                async for kind, value in _relay(p, events):
                    if kind == "start":
                        yield shape.start(len(p.generation.tokens), value)
                    elif kind == "text":
                        yield shape.piece(value)
                    else:
                        yield shape.end(value)
            except RuntimeError as e:
                yield event("error", anthropic_error_body(f"generation failed: {e}", "api_error"))

        return _sse(stream())

    return app


def _start(worker: Worker, p: parse.Parsed) -> asyncio.Queue:
    events: asyncio.Queue = asyncio.Queue()
    worker.generate(p.generation, events)  # Busy -> 503 before any byte is sent
    return events


async def _relay(p: parse.Parsed, events: asyncio.Queue):
    """The worker's events until "done"; a consumer that stops early (the client went away)
    cancels the generation."""
    finished = False
    try:
        while True:
            kind, value = await events.get()
            if kind == "error":
                raise RuntimeError(value)
            if kind == "done":
                finished = True
            yield kind, value
            if finished:
                return
    finally:
        if not finished:
            p.generation.cancelled.set()


async def _collect(p: parse.Parsed, events: asyncio.Queue):
    pieces = []
    try:
        async for kind, value in _relay(p, events):
            if kind == "text":
                pieces.append(value)
            elif kind == "done":
                return "".join(pieces), value
    except RuntimeError as e:
        raise parse.RequestError(500, f"generation failed: {e}", kind="server_error") from None


async def _openai(worker: Worker, p: parse.Parsed, shape: OpenAIShape):
    events = _start(worker, p)
    if not p.stream:
        text, done = await _collect(p, events)
        return shape.whole(text, done)

    async def stream():
        first = shape.start()
        if first:
            yield first
        try:
            async for kind, value in _relay(p, events):
                if kind == "text":
                    yield shape.piece(value)
                elif kind == "done":
                    yield shape.end(value, p.include_usage)
        except RuntimeError as e:  # the headers are out: the error goes in the stream
            yield sse(error_body(f"generation failed: {e}", "server_error"))

    return _sse(stream())


def _sse(chunks) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
