"""The OpenAI-compatible HTTP API on FastAPI: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/health`` and ``/metrics`` (Prometheus text: requests in the engine, free KV blocks).

A request is validated (body, model name, unsupported options, context length, then the engine's own
``check_request``) before anything is queued, so a caller's mistake is a 400 with OpenAI's error JSON and
never reaches the engine. ``stream: true`` answers with server-sent events ending in ``data: [DONE]``.
A client that disconnects has its requests aborted: streaming responses are cancelled by Starlette when the
client goes; non-streamed ones poll ``request.is_disconnected()`` while they wait.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..sampling_params import SamplingParams
from .engine_loop import EngineError, EngineLoop, Sink
from .protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from .responses import ResponseBuilder

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks whether its client is still there
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "chat_template", "tokenize", "tools", "documents")


@dataclass(slots=True)
class ServerState:
    """What the routes share: the engine loop and the model's tokenizer, name, context length and defaults."""

    loop: EngineLoop
    tokenizer: object
    model_name: str
    max_model_len: int
    defaults: SamplingParams = field(default_factory=SamplingParams)
    root: str = ""
    vocab_size: int | None = None  # the model's (an extension field of the /v1/models card, for benchmarks)
    created: int = field(default_factory=lambda: int(time.time()))


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine loop (if not running) and shuts it down."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not state.loop.is_alive:
            state.loop.start()
        yield
        state.loop.shutdown()

    app = FastAPI(title="pagedkv", lifespan=lifespan)
    app.state.server = state
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        return Response(status_code=200 if state.loop.is_alive else 503)

    @app.get("/metrics")
    async def metrics():
        """Prometheus text: requests in the engine and the KV pool's blocks (read on the engine thread)."""
        try:
            stats = await asyncio.wrap_future(state.loop.call(engine_stats))
        except EngineError as exc:
            raise OpenAIError(str(exc), status=503, type="service_unavailable") from None
        stats["pagedkv_engine_step_errors_total"] = state.loop.num_step_errors
        lines = [f"# TYPE {name} {'counter' if name.endswith('_total') else 'gauge'}\n{name} {value}"
                 for name, value in stats.items()]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "pagedkv",
                "root": state.root or state.model_name, "parent": None, "max_model_len": state.max_model_len,
                "vocab_size": state.vocab_size}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _precheck(state, body)
        prompts = body.prompts()
        ids = [_encode(state, p) for p in prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        return await _generate(state, request, body, "completions", ids, texts, body.max_tokens, body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _precheck(state, body)
        ids = [_chat_prompt(state, body)]
        return await _generate(state, request, body, "chat", ids, [None], body.requested_max_tokens,
                               body.num_logprobs)

    return app


def engine_stats(engine) -> dict:
    """Gauges of the engine's state (call on the engine thread)."""
    m = engine.manager
    return {"pagedkv_num_requests_running": len(engine.scheduler.running),
            "pagedkv_num_requests_waiting": len(engine.scheduler.waiting),
            "pagedkv_kv_num_blocks": m.num_blocks, "pagedkv_kv_num_free_blocks": m.num_free_blocks}


# -------------------------------------------------------------------------------------------- prompts
def _encode(state: ServerState, prompt) -> list[int]:
    if isinstance(prompt, str):
        return state.tokenizer.encode(prompt)
    return [int(t) for t in prompt]


def _chat_prompt(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    kwargs = dict(body.chat_template_kwargs or {})
    reserved = sorted(set(kwargs) & set(RESERVED_TEMPLATE_KWARGS))
    if reserved:
        raise OpenAIError(f"chat_template_kwargs may not set {reserved}", param="chat_template_kwargs")
    messages = [m.as_template_dict() for m in body.messages]
    try:
        return state.tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                                   tokenize=True, **kwargs)
    except ValueError as exc:
        raise OpenAIError(str(exc), param="messages") from None


def _params(state: ServerState, body, requested_max_tokens, num_logprobs, prompt_len: int) -> SamplingParams:
    """SamplingParams of one prompt; refuses (400) a prompt + completion longer than the model's context."""
    remaining = state.max_model_len - prompt_len
    if requested_max_tokens is None and remaining < 1:
        raise _context_error(state, prompt_len, 0)
    max_tokens = remaining if requested_max_tokens is None else requested_max_tokens
    params = body.sampling_params(state.defaults, max_tokens, num_logprobs)
    if prompt_len + max_tokens > state.max_model_len:
        raise _context_error(state, prompt_len, max_tokens)
    return params


def _context_error(state: ServerState, prompt_len: int, max_tokens: int) -> OpenAIError:
    return OpenAIError(f"This model's maximum context length is {state.max_model_len} tokens. However, you requested "
                       f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                       f"completion). Please reduce the prompt or max_tokens.", param="prompt",
                       code="context_length_exceeded")


# --------------------------------------------------------------------------------------------- generate
def _precheck(state: ServerState, body) -> None:
    """The model name and the options this server cannot honour, before any tokenizing."""
    if body.model != state.model_name:
        raise OpenAIError(f"The model `{body.model}` does not exist; this server serves `{state.model_name}`.",
                          param="model", code="model_not_found")
    body.refuse_unsupported()


async def _generate(state: ServerState, request: Request, body, kind: str, ids, texts, requested_max_tokens,
                    num_logprobs):
    params = [_params(state, body, requested_max_tokens, num_logprobs, len(p)) for p in ids]
    try:
        sink = await state.loop.submit(ids, params, texts)
    except ValueError as exc:
        raise OpenAIError(str(exc)) from None
    except EngineError as exc:
        raise OpenAIError(str(exc), status=503, type="service_unavailable") from None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    builder = ResponseBuilder(kind, state.model_name, body.n, [len(p) for p in ids], state.tokenizer, num_logprobs,
                              include_usage)
    if body.stream:
        return StreamingResponse(_stream(state, builder, sink), media_type="text/event-stream")
    return await _complete(state, request, builder, sink)


def _take(builder: ResponseBuilder, items) -> EngineError | None:
    for index, item in items:
        if index is None:
            return item
        builder.update(index, item)
    return None


async def _stream(state: ServerState, builder: ResponseBuilder, sink: Sink):
    try:
        if (chunk := builder.role_chunk()) is not None:
            yield _sse(chunk)
        while not builder.finished:
            error = _take(builder, await sink.get_all())
            if error is not None:
                yield _sse(OpenAIError(str(error), status=500, type="internal_server_error").body())
                break
            if (chunk := builder.delta_chunk()) is not None:
                yield _sse(chunk)
        else:
            if (chunk := builder.usage_chunk()) is not None:
                yield _sse(chunk)
        yield "data: [DONE]\n\n"
    finally:  # NOTE: also runs when Starlette cancels the stream because the client disconnected
        if not builder.finished:
            state.loop.abort(sink.request_ids)


async def _complete(state: ServerState, request: Request, builder: ResponseBuilder, sink: Sink):
    pending, next_poll = None, time.monotonic() + DISCONNECT_POLL_S
    try:
        while not builder.finished:
            pending = pending or asyncio.ensure_future(sink.get_all())
            done, _ = await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
            if time.monotonic() >= next_poll:  # NOTE: polled on a clock: outputs may never pause long enough
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; the finally clause aborts
                next_poll = time.monotonic() + DISCONNECT_POLL_S
            if not done:
                continue
            items, pending = pending.result(), None
            error = _take(builder, items)
            if error is not None:
                raise OpenAIError(str(error), status=500, type="internal_server_error")
        return JSONResponse(builder.response())
    finally:
        if pending is not None:
            pending.cancel()
        if not builder.finished:
            state.loop.abort(sink.request_ids)


# ----------------------------------------------------------------------------------------------- errors
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return JSONResponse(OpenAIError(message, param=loc[0] if loc else None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(OpenAIError(str(exc.detail), status=exc.status_code, type=kind).body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        message = f"internal error: {type(exc).__name__}: {exc}"
        return JSONResponse(OpenAIError(message, status=500, type="internal_server_error").body(), status_code=500)
