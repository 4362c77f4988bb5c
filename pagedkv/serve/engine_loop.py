"""One thread owns the engine; asyncio handlers reach it through a command queue.

::

    asyncio handlers (event loop thread)              engine thread (EngineLoop._run)
    ------------------------------------              --------------------------------------------
    await loop.submit(prompts, params) ── command ──►  check_request every prompt, then add_request each
         ◄── request ids (or ValueError: a 400) ──────
    async for out in sink: ...         ◄── outputs ──  step(); each RequestOutput to its sink's asyncio.Queue
                                                       (loop.call_soon_threadsafe)
    client gone: loop.abort(ids)       ── command ──►  abort_request: blocks freed at once

The engine is never touched outside its thread (it is single-threaded by contract). A step that raises aborts
the requests it scheduled (the engine's contract) and reports them with the next step as "abort" outputs: their
sinks get the step's error, the other requests go on, and the loop keeps serving.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable

logger = logging.getLogger("pagedkv.serve")


class EngineError(RuntimeError):
    """The engine failed while running a request (not the caller's fault)."""


class Sink:
    """Where the outputs of one HTTP request's engine requests go: ``(prompt_index, RequestOutput)`` items,
    or ``(None, EngineError)``, on an asyncio queue owned by the handler's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_ids: list = []

    def put(self, item) -> None:
        """Thread-safe: called from the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # NOTE: the event loop closed (server shutting down): nobody is listening
            pass

    async def get_all(self) -> list:
        """Wait for at least one item, then take every item queued (outputs are cumulative: the last counts)."""
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items


class EngineLoop:
    """Runs ``engine.step()`` in a thread while requests arrive and leave.

    Args:
        engine: an :class:`~pagedkv.engine.LLMEngine` (or anything with ``check_request``, ``add_request``,
            ``abort_request``, ``step`` and ``has_unfinished_requests``).
    """

    def __init__(self, engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict = {}  # engine request id -> (sink, prompt index); touched by the engine thread only
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pagedkv-engine-loop", daemon=True)
        self.num_step_errors = 0
        self._step_error: EngineError | None = None  # the last failed step's, for the requests it aborted

    # ----------------------------------------------------------------------------------- any thread
    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop after the current step; unfinished requests are aborted (their blocks freed)."""
        self._stopping.set()
        self._commands.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the engine thread between steps; its result (or exception) in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self.is_alive:
            future.set_exception(EngineError("the engine loop is not running"))
            return future
        self._commands.put((fn, future))
        return future

    async def submit(self, prompts: list[list[int]], params: list, texts=None) -> Sink:
        """Queue one request per prompt, with ``params[i]`` (all validated first: one bad prompt queues none).

        Raises:
            ValueError: a request the engine refuses (too long, n too large, ...); nothing was queued.
        """
        sink = Sink(asyncio.get_running_loop())
        texts = texts or [None] * len(prompts)
        await asyncio.wrap_future(self.call(lambda engine: self._add(engine, sink, prompts, params, texts)))
        return sink

    def abort(self, request_ids) -> None:
        """Abort requests (unknown or finished ids are ignored); thread-safe, returns at once."""
        ids = list(request_ids)
        if ids and self.is_alive:
            self._commands.put((lambda engine: self._abort(engine, ids), None))

    # --------------------------------------------------------------------------------- engine thread
    def _add(self, engine, sink: Sink, prompts, params, texts) -> list:
        for prompt, p in zip(prompts, params):
            engine.check_request(prompt, p)
        try:
            for i, (prompt, p, text) in enumerate(zip(prompts, params, texts)):
                request_id = engine.add_request(prompt, p, prompt=text)
                sink.request_ids.append(request_id)
                self._sinks[request_id] = (sink, i)
        except Exception:
            self._abort(engine, sink.request_ids)  # NOTE: all or nothing, as check_request promised
            raise
        return sink.request_ids

    def _abort(self, engine, request_ids) -> None:
        for request_id in request_ids:
            if self._sinks.pop(request_id, None) is not None:
                engine.abort_request(request_id)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._run_commands(block=not self.engine.has_unfinished_requests())
                if not self._stopping.is_set() and self.engine.has_unfinished_requests():
                    self._step()
            except Exception as exc:  # NOTE: the loop must outlive any bug: fail the requests, keep serving
                logger.exception("engine loop iteration failed")
                self._fail_all(EngineError(f"engine loop failed: {type(exc).__name__}: {exc}"))
        self._run_commands(block=False)
        self._fail_all(EngineError("the server is shutting down"))

    def _run_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=1.0) if block else self._commands.get_nowait()
            while True:
                if command is not None:
                    self._execute(*command)
                command = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _execute(self, fn, future) -> None:
        if future is not None and not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(self.engine)
        except BaseException as exc:  # NOTE: a command's error belongs to its caller, never to the loop
            if future is None:
                logger.exception("engine loop command failed")
            else:
                future.set_exception(exc)
        else:
            if future is not None:
                future.set_result(result)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # NOTE: the engine aborted what that step scheduled; it reports them next step
            self.num_step_errors += 1
            self._step_error = EngineError(f"engine step failed: {type(exc).__name__}: {exc}")
            logger.exception("engine step failed; its requests are aborted")
            return
        for out in outputs:
            entry = self._sinks.get(out.request_id)
            if entry is None:
                continue
            sink, index = entry
            if out.finished:
                del self._sinks[out.request_id]
                if any(c.finish_reason == "abort" for c in out.outputs):  # not ours: ours left _sinks first
                    sink.put((None, self._step_error or EngineError("the engine aborted the request")))
                    continue
            sink.put((index, out))

    def _fail_all(self, error: EngineError) -> None:
        sinks = {id(s): s for s, _ in self._sinks.values()}
        for request_id in list(self._sinks):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # NOTE: keep aborting the others; the error is already being reported
                logger.exception("abort_request(%r) failed", request_id)
        self._sinks.clear()
        for sink in sinks.values():
            sink.put((None, error))
