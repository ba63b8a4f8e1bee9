"""The OpenAI-compatible HTTP server: FastAPI routes over one ServingLoop.

  POST /v1/chat/completions   chat, with reasoning, tool calls, streaming, n
  POST /v1/responses          the Responses API (OpenAI's recommendation for gpt-oss), streaming too
  POST /v1/completions        raw text in, raw text out
  GET  /v1/models, /health, /metrics (Prometheus text format)

Every error is OpenAI's JSON error body with a fitting status: 400 for a bad body (naming the field),
401 without the API key when one is set, 404 for an unknown model or route, 429 when the queue is full
(with Retry-After), 500 for a fault of ours, which is logged and never stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptoss_jax.chat.harmony import decode_text, render_chat, stop_tokens
from gptoss_jax.inference.batching import Batcher, Request
from gptoss_jax.inference.engine import GenerationError
from gptoss_jax.serving import responses
from gptoss_jax.serving.loop import QueueFull, ServingLoop
from gptoss_jax.serving.protocol import (ApiError, Generation, OutputReader, chat_request, field_of, new_id,
                                         responses_request, sampling_of)  # fmt: skip

log = logging.getLogger("gptoss_jax.serve")
RETRY_AFTER_S = 1


def create_app(batcher: Batcher, encoding, model_name: str, *, max_queue: int = 64, api_key: str | None = None,
               forced_output: Callable[[list[int]], list[int] | None] | None = None) -> FastAPI:  # fmt: skip
    """The server for `batcher`'s model. `forced_output` is a test hook: given a request's prompt
    tokens, the tokens the engine emits in place of sampled ones (or None to sample)."""
    loop = ServingLoop(batcher, max_queue=max_queue)
    stops = stop_tokens(encoding)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        loop.close()

    app = FastAPI(title="gptoss_jax", lifespan=lifespan)
    app.state.loop = loop

    @app.middleware("http")
    async def check_key(request: HttpRequest, call_next):
        if api_key and request.url.path.startswith("/v1/") and request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error",
                                   code="invalid_api_key"))  # fmt: skip
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        return _error(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, error: StarletteHTTPException):
        return _error(ApiError(error.status_code, str(error.detail), kind="invalid_request_error"))

    @app.exception_handler(Exception)
    async def internal_error(_, error: Exception):
        log.exception("internal error")
        return _error(ApiError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error"))

    async def body_of(request: HttpRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        model = field_of(body, "model", str, required=True)
        if model != model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                           code="model_not_found")  # fmt: skip
        return body

    def submit(prompt: list[int], max_tokens: int | None, gen_sampling, seed: int | None, n: int, stop: list[int]):
        """n requests for one prompt (seeds seed, seed + 1, ...), refused whole if the queue is full."""
        room = batcher.context - len(prompt)
        if room < 1 or (max_tokens or 1) > room:
            raise ApiError(400, f"this model's context is {batcher.context} tokens; the prompt has {len(prompt)} and "
                                f"max_tokens asks for {max_tokens or 1} more", "max_tokens",
                           code="context_length_exceeded")  # fmt: skip
        base = random.randrange(2**31) if seed is None else seed
        forced = (forced_output(prompt) if forced_output else None) or ()
        tickets = []
        try:
            for index in range(n):
                request = Request(prompt, max_tokens or room, gen_sampling, (base + index) % 2**32, stop, forced)
                tickets.append(loop.submit(request))
        except QueueFull as error:
            for ticket in tickets:
                loop.cancel(ticket)
            raise ApiError(429, f"the server is busy ({error}); retry after {RETRY_AFTER_S} s", kind="rate_limit_error",
                           code="queue_full") from None  # fmt: skip
        except GenerationError as error:
            raise ApiError(400, str(error)) from None
        return tickets

    def chat_prompt(gen: Generation) -> list[int]:
        try:
            return render_chat(encoding, gen.messages, reasoning_effort=gen.reasoning_effort, developer=gen.developer,
                               tools=gen.tools)  # fmt: skip
        except Exception as error:  # harmony refused the conversation (e.g. a malformed tool schema)
            raise ApiError(400, f"cannot render the conversation: {error}", "messages") from None

    async def read(ticket, reader: OutputReader) -> AsyncIterator[tuple[list, str | None]]:
        """(deltas, finish reason or None) per generated token; a stop string ends the request early."""
        async for event in loop.stream(ticket):
            if event.finish_reason == "error":
                raise ApiError(500, "the engine failed on this request (logged); retry", kind="server_error")
            deltas = reader.push(event.token)
            if event.finished or reader.stopped:
                if not event.finished:
                    loop.cancel(ticket)
                yield deltas + reader.finish(), "tool_calls" if reader.tool_calls else event.finish_reason or "stop"
                return
            yield deltas, None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "gptoss_jax"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(responses.prometheus(loop), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await body_of(request)
        gen = chat_request(body)
        prompt = chat_prompt(gen)
        tickets = submit(prompt, gen.max_tokens, gen.sampling, gen.seed, gen.n, stops)
        readers = [OutputReader(encoding, gen.stop) for _ in tickets]
        chat = responses.Chat(new_id("chatcmpl-"), int(time.time()), model_name, len(prompt))
        if field_of(body, "stream", bool, False):
            usage = bool((field_of(body, "stream_options", dict) or {}).get("include_usage"))

            async def chunks():
                yield _sse(chat.first_chunk(len(tickets)))
                try:
                    async for index, deltas, finish in _merged([read(t, r) for t, r in zip(tickets, readers)], loop, tickets):
                        for chunk in chat.chunks(index, deltas, finish):
                            yield _sse(chunk)
                except ApiError as error:  # the status is sent: the error goes in the stream, as OpenAI's does
                    yield _sse(error.body())
                    return
                if usage:
                    yield _sse(chat.usage_chunk(readers))
                yield "data: [DONE]\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream")
        try:
            finishes = await asyncio.gather(*(_last(read(t, r)) for t, r in zip(tickets, readers)))
        finally:  # on a failure, the other choices stop too (finished ones are ignored)
            for ticket in tickets:
                loop.cancel(ticket)
        return chat.completion(readers, finishes)

    @app.post("/v1/responses")
    async def create_response(request: HttpRequest):
        body = await body_of(request)
        gen = responses_request(body)
        prompt = chat_prompt(gen)
        (ticket,) = submit(prompt, gen.max_tokens, gen.sampling, gen.seed, 1, stops)
        reader = OutputReader(encoding)
        builder = responses.ResponseBuilder(model_name, body, gen, len(prompt))
        if field_of(body, "stream", bool, False):

            async def events():
                try:
                    for out in builder.start():
                        yield _sse(out, out["type"])
                    async for deltas, finish in read(ticket, reader):
                        for out in builder.push(deltas) + (builder.finish(reader, finish) if finish else []):
                            yield _sse(out, out["type"])
                except ApiError as error:
                    yield _sse({"type": "error", "code": error.code, "message": error.message, "param": error.param}, "error")
                finally:
                    loop.cancel(ticket)

            return StreamingResponse(events(), media_type="text/event-stream")
        async for deltas, finish in read(ticket, reader):
            builder.push(deltas)
            if finish:
                builder.finish(reader, finish)
        return builder.response

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await body_of(request)
        text = field_of(body, "prompt", str, required=True)
        prompt = encoding.encode(text, allowed_special="all")
        if not prompt:
            raise ApiError(400, "'prompt' is empty", "prompt")
        sampling, seed = sampling_of(body)
        max_tokens = field_of(body, "max_tokens", int, 16)
        (ticket,) = submit(prompt, max_tokens, sampling, seed, 1, [])
        tokens, reason = [], "length"
        async for event in loop.stream(ticket):
            if event.finish_reason == "error":
                raise ApiError(500, "the engine failed on this request (logged); retry", kind="server_error")
            tokens.append(event.token)
            reason = event.finish_reason
        return {
            "id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "text": decode_text(encoding, tokens), "finish_reason": reason, "logprobs": None}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(tokens), "total_tokens": len(prompt) + len(tokens)},
        }  # fmt: skip

    return app


def _error(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 429 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _sse(payload: dict, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n"


async def _last(stream) -> str:
    """Read a choice to its end; its finish reason."""
    finish = "stop"
    async for _, finish in stream:
        pass
    return finish


async def _merged(streams: list, loop: ServingLoop, tickets: list) -> AsyncIterator[tuple[int, list, object]]:
    """(choice index, deltas, event) from several choices' streams as they come; cancels all on exit."""
    queue: asyncio.Queue = asyncio.Queue()

    async def forward(index, stream):
        try:
            async for deltas, event in stream:
                await queue.put((index, deltas, event))
            await queue.put((index, None, None))
        except Exception as error:  # e.g. the engine failed this choice: end the whole response
            await queue.put((index, error, None))

    tasks = [asyncio.create_task(forward(index, stream)) for index, stream in enumerate(streams)]
    open_streams = len(tasks)
    try:
        while open_streams:
            index, deltas, event = await queue.get()
            if isinstance(deltas, Exception):
                raise deltas
            if deltas is None:
                open_streams -= 1
                continue
            yield index, deltas, event
    finally:
        for task in tasks:
            task.cancel()
        for ticket in tickets:  # a client gone midway: free the slots (finished requests are ignored)
            loop.cancel(ticket)
