"""The OpenAI-compatible HTTP API on FastAPI.

::

    /v1/models, /v1/models/{id}          the served model's card (404 model_not_found for another id)
    /v1/completions, /v1/chat/completions    generate (see :mod:`pagedkv.serve.generate`)
    /tokenize, /detokenize, /version     vLLM's utility routes
    /health                              200 while the engine loop runs (answered on the event loop at once)
    /metrics                             Prometheus text (see :mod:`pagedkv.serve.metrics`)

A request is validated (body size, auth, body shape, model, limits, context length, then the engine's own
``check_request``) before anything is queued, so a caller's mistake is a 4xx with OpenAI's error JSON and never
reaches the engine; tokenizing and chat templates run off the event loop (:mod:`pagedkv.serve.prompts`).
A 500's body never carries internal exception text (the log does, under the request id).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..sampling_params import SamplingParams
from ..engine.async_llm import AsyncLLM, EngineError
from .generate import check_model, generate, token_ids
from .limits import ServerLimits
from .metrics import ServerMetrics, engine_snapshot
from .middleware import ServerMiddleware
from .prompts import PromptWorkers
from .body_checks import early_fan_out_check, parse_json_body
from .errors import OpenAIError
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

logger = logging.getLogger("pagedkv.serve")
STATS_LOG_INTERVAL_S = 5.0


@dataclass(slots=True)
class ServerState:
    """What the routes share: the engine loop and the model's tokenizer, name, context length and defaults."""

    loop: AsyncLLM
    tokenizer: object
    model_name: str
    max_model_len: int
    defaults: SamplingParams = field(default_factory=SamplingParams)
    root: str = ""
    vocab_size: int | None = None  # the model's (an extension field of the /v1/models card, for benchmarks)
    created: int = field(default_factory=lambda: int(time.time()))
    limits: ServerLimits = field(default_factory=ServerLimits)
    api_key: str | None = None
    chat_template: str | None = None  # --chat-template: jinja2 source used instead of the tokenizer's
    stats_log_interval_s: float = STATS_LOG_INTERVAL_S
    workers: PromptWorkers | None = None
    metrics: ServerMetrics | None = None

    def __post_init__(self):
        self.workers = self.workers or PromptWorkers(self.tokenizer, self.limits, self.max_model_len)
        self.metrics = self.metrics or ServerMetrics(self.model_name)


def create_app(state: ServerState):
    """The ASGI app (FastAPI inside the body-limit / auth middleware); its lifespan starts the engine loop (if
    not running), the stats log, and shuts both down."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not state.loop.is_alive:
            state.loop.start()
        stats = asyncio.create_task(_stats_log(state))
        yield
        stats.cancel()
        state.loop.shutdown()
        state.workers.shutdown()

    app = FastAPI(title="pagedkv", lifespan=lifespan)
    app.state.server = state
    _add_error_handlers(app)
    _add_info_routes(app, state)
    _add_text_routes(app, state)
    _add_generate_routes(app, state)
    return ServerMiddleware(app, max_body_bytes=state.limits.max_request_body_bytes, api_key=state.api_key)


async def snapshot(state: ServerState):
    loop = state.loop
    snap = await asyncio.wrap_future(loop.call(lambda engine: engine_snapshot(engine, loop.num_pending)))
    state.metrics.update(snap, loop.num_step_errors)
    return snap


async def _stats_log(state: ServerState) -> None:
    while True:
        await asyncio.sleep(state.stats_log_interval_s)
        try:
            line = state.metrics.log_line(await snapshot(state))
        except EngineError:
            continue
        if line is not None:
            logger.info("%s", line)


def _card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "pagedkv",
            "root": state.root or state.model_name, "parent": None, "max_model_len": state.max_model_len,
            "vocab_size": state.vocab_size}


async def parse_body(request: Request, model, limits: ServerLimits | None = None):
    """The body as ``model``: JSON parsed and lone surrogates refused (400), the fan-out cap checked on the raw
    JSON (a 2,000-prompt body is refused before its prompts are validated), then pydantic (400 naming the field)."""
    from pydantic import ValidationError

    data = parse_json_body(await request.body())
    if limits is not None:
        early_fan_out_check(data, limits)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        return Response(status_code=200 if state.loop.is_alive else 503)

    @app.get("/version")
    async def version():
        from .. import __version__

        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        try:
            await snapshot(state)
        except EngineError:
            raise OpenAIError("the engine loop is not running", status=503, type="service_unavailable") from None
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(state, model_id)
        return _card(state)


def _add_text_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await parse_body(request, TokenizeRequest)
        check_model(state, body.model)
        if body.prompt is not None:
            ids = await state.workers.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            text = await state.workers.render(body.messages, body.add_generation_prompt, body.chat_template_kwargs,
                                              state.chat_template)
            ids = await state.workers.encode(text, add_special_tokens=False, param="messages")
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await parse_body(request, DetokenizeRequest)
        check_model(state, body.model)
        ids = token_ids(state, body.tokens) if body.tokens else []
        return {"prompt": state.tokenizer.decode(ids, skip_special_tokens=False)}


def _add_generate_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest, state.limits)
        check_model(state, body.model)
        body.refuse_unsupported()
        prompts = body.prompts()
        body.check_limits(state.limits, len(prompts))
        ids = [await state.workers.encode(p) if isinstance(p, str) else token_ids(state, p) for p in prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        echo = None
        if body.echo:
            echo = [p if isinstance(p, str) else state.tokenizer.decode(i, skip_special_tokens=False)
                    for p, i in zip(prompts, ids)]
        return await generate(state, request, body, "completions", ids, texts, body.max_tokens, body.logprobs, echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest, state.limits)
        check_model(state, body.model)
        body.refuse_unsupported()
        body.check_limits(state.limits, 1)
        ids = [await state.workers.chat_ids(body, state.chat_template)]
        return await generate(state, request, body, "chat", ids, [None], body.requested_max_tokens,
                              body.num_logprobs)


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
        message = message.encode("utf-8", "replace").decode("utf-8")[:2000]  # NOTE: may quote a lone surrogate
        return JSONResponse(OpenAIError(message, param=loc[0] if loc else None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(OpenAIError(str(exc.detail), status=exc.status_code, type=kind).body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        request_id = request.scope.get("state", {}).get("request_id", "-")
        logger.error("request %s: internal error", request_id, exc_info=exc)
        message = f"internal server error (request id {request_id}; details in the server log)"
        return JSONResponse(OpenAIError(message, status=500, type="internal_server_error").body(), status_code=500)
