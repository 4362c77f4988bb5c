"""The two generating routes' common path: prompts and parameters checked, requests queued on the engine loop
(:class:`~pagedkv.engine.async_llm.AsyncLLM`), outputs turned into a JSON body or server-sent events.

::

    body ─► precheck (model: 404, unsupported options, prompts x n and stop caps: 400)
         ─► prompts to ids off the event loop (PromptWorkers: tokenizer / chat template; 400 / 413 / 503)
         ─► SamplingParams per prompt (context length: 400) ─► AsyncLLM.submit(group = user or request)
         ─► stream: one chunk per choice with new text, [DONE] │ whole: one body after the last output

A client that disconnects has its requests aborted: Starlette cancels a streaming response when the client
goes; a non-streamed one polls ``request.is_disconnected()`` while it waits. An engine failure is a 500 whose
body says only that the engine failed (the details go to the log under the request id).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.async_llm import EngineError, Sink
from .errors import OpenAIError
from .responses import ResponseBuilder, new_request_id

logger = logging.getLogger("pagedkv.serve")
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks whether its client is still there
ENGINE_FAILED = "the engine failed while running this request; see the server log"


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def check_model(state, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise OpenAIError(f"The model `{model}` does not exist.", status=404, type="invalid_request_error", param="model",
                          code="model_not_found")


def context_error(state, prompt_len: int, max_tokens: int) -> OpenAIError:
    return OpenAIError(f"This model's maximum context length is {state.max_model_len} tokens. However, you requested "
                       f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                       f"completion). Please reduce the prompt or max_tokens.", param="prompt",
                       code="context_length_exceeded")


def sampling_params(state, body, requested_max_tokens, num_logprobs, prompt_len: int):
    """SamplingParams of one prompt; refuses (400) a prompt + completion longer than the model's context."""
    remaining = state.max_model_len - prompt_len
    if requested_max_tokens is None and remaining < 1:
        raise context_error(state, prompt_len, 0)
    max_tokens = remaining if requested_max_tokens is None else requested_max_tokens
    params = body.sampling_params(state.defaults, max_tokens, num_logprobs)
    if prompt_len + max_tokens > state.max_model_len:
        raise context_error(state, prompt_len, max_tokens)
    return params


def token_ids(state, prompt: list[int]) -> list[int]:
    vocab = state.vocab_size
    if vocab is not None and any(not 0 <= t < vocab for t in prompt):
        bad = next(t for t in prompt if not 0 <= t < vocab)
        raise OpenAIError(f"prompt token {bad} is outside the vocabulary [0, {vocab})", param="prompt")
    if len(prompt) > state.workers.max_prompt_tokens:
        raise OpenAIError(f"the prompt has {len(prompt)} tokens, more than this server's limit of "
                          f"{state.workers.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
    return list(prompt)


class Generation:
    """One HTTP request's engine requests: its response builder, its sink, and what metrics have seen."""

    def __init__(self, state, builder: ResponseBuilder, sink: Sink):
        self.state, self.builder, self.sink = state, builder, sink
        self.last: dict = {}  # prompt index -> the newest output

    def take(self, items) -> EngineError | None:
        """Feed outputs to the builder and the metrics; the engine's error if one came."""
        for index, item in items:
            if index is None:
                return item
            self.state.metrics.observe_tokens(self.last.get(index), item)
            self.last[index] = item
            if item.finished:
                self.state.metrics.observe_finished(item, self.sink.submit_time, time.perf_counter())
            self.builder.update(index, item)
        return None

    def abort_unless_finished(self) -> None:
        if not self.builder.finished:
            self.state.loop.abort(self.sink.request_ids)
            logger.info("request %s aborted (client gone or failed)", self.builder.id)

    def engine_failed(self, error: EngineError) -> OpenAIError:
        logger.error("request %s failed in the engine: %s", self.builder.id, error)
        return OpenAIError(ENGINE_FAILED, status=500, type="internal_server_error")


async def generate(state, request: Request, body, kind: str, ids: list[list[int]], texts, requested_max_tokens,
                   num_logprobs, echo: list[str] | None = None):
    request_id = new_request_id(kind)
    params = [sampling_params(state, body, requested_max_tokens, num_logprobs, len(p)) for p in ids]
    group = ("user", body.user) if body.user else ("request", request_id)
    try:
        sink = await state.loop.submit(ids, params, texts, group=group,
                                       request_ids=[f"{request_id}-{i}" for i in range(len(ids))])
    except ValueError as exc:
        raise OpenAIError(str(exc)) from None
    except EngineError:
        raise OpenAIError("the engine loop is not running", status=503, type="service_unavailable") from None
    logger.info("request %s (%s): %d prompt(s), %d prompt tokens, n=%d, max_tokens=%d%s", request_id,
                request.scope.get("state", {}).get("request_id", "-"), len(ids), sum(map(len, ids)), body.n,
                params[0].max_tokens, ", stream" if body.stream else "")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    builder = ResponseBuilder(kind, state.model_name, body.n, [len(p) for p in ids], state.tokenizer, num_logprobs,
                              include_usage, request_id=request_id, echo=echo)
    gen = Generation(state, builder, sink)
    if body.stream:
        return StreamingResponse(_stream(gen), media_type="text/event-stream")
    return await _complete(gen, request)


async def _stream(gen: Generation):
    builder = gen.builder
    try:
        for chunk in builder.role_chunks():
            yield sse(chunk)
        while not builder.finished:
            error = gen.take(await gen.sink.get_all())
            if error is not None:
                yield sse(gen.engine_failed(error).body())
                break
            for chunk in builder.delta_chunks():
                yield sse(chunk)
        else:
            if (chunk := builder.usage_chunk()) is not None:
                yield sse(chunk)
        yield "data: [DONE]\n\n"
    finally:  # NOTE: also runs when Starlette cancels the stream because the client disconnected
        gen.abort_unless_finished()


async def _complete(gen: Generation, request: Request):
    pending, next_poll = None, time.monotonic() + DISCONNECT_POLL_S
    try:
        while not gen.builder.finished:
            pending = pending or asyncio.ensure_future(gen.sink.get_all())
            done, _ = await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
            if time.monotonic() >= next_poll:  # NOTE: polled on a clock: outputs may never pause long enough
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; the finally clause aborts
                next_poll = time.monotonic() + DISCONNECT_POLL_S
            if not done:
                continue
            items, pending = pending.result(), None
            error = gen.take(items)
            if error is not None:
                raise gen.engine_failed(error)
        return JSONResponse(gen.builder.response())
    finally:
        if pending is not None:
            pending.cancel()
        gen.abort_unless_finished()
