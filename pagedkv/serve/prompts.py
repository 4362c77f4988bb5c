"""Prompts to token ids off the event-loop thread: tokenizing (with the GIL released) and chat templates (in
worker threads, under a time limit), each failure a 4xx naming what to fix.

::

    handler (event loop)                          worker threads (PromptWorkers)
    await encode(text)         ── tokenize ──►    Tokenizer.encode_off_gil: the GIL is released while the
                                                  tokenizer runs; more than max_prompt_tokens: no id list
    await chat_ids(body)       ── render   ──►    the chat template (jinja2 sandbox); slower than
                                                  chat_template_timeout_s: a 400 (the worker is left to finish)

NOTE: a Python thread cannot be stopped from outside: a template that never ends keeps its worker until the
template module's own limits stop it. The template pool is therefore separate from the tokenizer pool (a
stuck template never delays tokenizing) and a render waits for a worker at most the same timeout.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from .limits import ServerLimits
from .errors import OpenAIError
from .protocol import ChatCompletionRequest

# what chat_template_kwargs may not set: the template call's own arguments and the renderer's
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "add_generation_prompt", "chat_template", "tokenize", "tools",
                                      "documents", "special_tokens", "source", "self", "continue_final_message"})


TRIM_AFTER_CHARS = 2**20  # a text this long leaves megabytes of freed tokenizer memory in the worker's arena


def release_free_memory() -> None:
    """glibc's ``malloc_trim(0)`` in this thread (its arena): freed memory goes back to the OS (no-op elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class DaemonPool:
    """At most ``max_workers`` calls at once, each in a daemon thread of its own: a call that never returns
    (a runaway template) holds one slot but never blocks the interpreter's exit, as an executor's thread would."""

    def __init__(self, max_workers: int, name: str):
        self.slots, self.name = threading.BoundedSemaphore(max_workers), name
        self.num_running = 0  # calls started and not returned (read for tests and logs)

    def submit(self, fn, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            with self.slots:  # NOTE: waits here, in its own thread, while every slot is taken
                if not future.set_running_or_notify_cancel():
                    return
                self.num_running += 1
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # NOTE: the caller's to handle, in its own thread
                    future.set_exception(exc)
                finally:
                    self.num_running -= 1

        threading.Thread(target=run, name=self.name, daemon=True).start()
        return future

    def shutdown(self, **_) -> None:
        pass


class PromptWorkers:
    """The thread pools of one server (tokenizing, templates) and its limits."""

    def __init__(self, tokenizer, limits: ServerLimits, max_model_len: int):
        self.tokenizer, self.limits = tokenizer, limits
        self.max_prompt_tokens = min(limits.max_prompt_tokens or max_model_len, max_model_len)
        # NOTE: persistent threads: each new thread gets a fresh malloc arena, which keeps what a large
        # tokenization freed (RSS grew 100 MB per refused 4 MB prompt with a thread per call)
        self.tokenize_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="pagedkv-tokenize")
        self.template_pool = DaemonPool(4, "pagedkv-template")

    def shutdown(self) -> None:
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self.template_pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, pool, timeout: float, fn, *args):
        future = pool.submit(fn, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        finally:
            future.cancel()  # NOTE: a no-op once it runs; frees the slot of one still queued

    # ------------------------------------------------------------------------------------------ text
    async def encode(self, text: str, *, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """Token ids of a text prompt. Raises OpenAIError: 400 over ``max_prompt_tokens``, 503 on a timeout."""
        limit = self.max_prompt_tokens
        encode = getattr(self.tokenizer, "encode_off_gil", None)
        try:
            if encode is None:
                ids = await self._run(self.tokenize_pool, self.limits.tokenize_timeout_s, self.tokenizer.encode, text,
                                      add_special_tokens)
            else:
                ids = await self._run(self.tokenize_pool, self.limits.tokenize_timeout_s, encode, text,
                                      add_special_tokens, limit)
        except asyncio.TimeoutError:
            raise OpenAIError(f"tokenizing the prompt took longer than {self.limits.tokenize_timeout_s:g} s",
                              status=503, type="service_unavailable", param=param) from None
        except ValueError as exc:
            raise OpenAIError(str(exc), param=param) from None
        if len(text) > TRIM_AFTER_CHARS:
            await self._run(self.tokenize_pool, self.limits.tokenize_timeout_s, release_free_memory)
        if ids is None or len(ids) > limit:
            source = "--max-prompt-tokens" if self.limits.max_prompt_tokens else "max_model_len"
            raise OpenAIError(f"the prompt has more than {limit} tokens, this server's limit ({source})",
                              param=param, code="context_length_exceeded")
        return ids

    # ------------------------------------------------------------------------------------------ chat
    async def chat_ids(self, body: ChatCompletionRequest, chat_template: str | None = None) -> list[int]:
        """The conversation rendered by the chat template, as token ids (the template writes special tokens)."""
        text = await self.render(body.messages, body.add_generation_prompt, body.chat_template_kwargs, chat_template)
        return await self.encode(text, add_special_tokens=False, param="messages")

    async def render(self, messages, add_generation_prompt: bool, template_kwargs: dict | None,
                     chat_template: str | None = None) -> str:
        kwargs = dict(template_kwargs or {})
        reserved = sorted(set(kwargs) & RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise OpenAIError(f"chat_template_kwargs may not set {reserved}", param="chat_template_kwargs")
        if any(not isinstance(k, str) or not k.isidentifier() for k in kwargs):
            raise OpenAIError("chat_template_kwargs keys must be identifiers", param="chat_template_kwargs")
        dicts = [m.as_template_dict(i) for i, m in enumerate(messages)]
        timeout = self.limits.chat_template_timeout_s
        try:
            return await self._run(self.template_pool, timeout, self._render, dicts, add_generation_prompt,
                                   chat_template, kwargs)
        except asyncio.TimeoutError:
            raise OpenAIError(f"the chat template did not finish rendering these messages within {timeout:g} s",
                              param="messages") from None

    def _render(self, messages, add_generation_prompt, chat_template, kwargs) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      chat_template=chat_template, tokenize=False, **kwargs)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, MemoryError,
                OverflowError) as exc:
            # NOTE: a template that trips over a caller's message (a wrong type, a missing key) fails inside
            # jinja2 with a Python error: the caller's mistake, a 400 (ChatTemplateError names the message)
            message = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            raise OpenAIError(f"chat template: {message}"[:1000], param="messages") from None
