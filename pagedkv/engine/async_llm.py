"""AsyncLLM: the engine driven from asyncio. One thread owns the engine; coroutines reach it through queues.

::

    async for out in llm.generate(prompt_ids, params, "req-1"):   # cumulative RequestOutputs; the last finished
        ...

    asyncio code (event loop thread)                  engine thread (AsyncLLM._run)
    --------------------------------                  ---------------------------------------------------
    await llm.submit(prompts, params, group) ─ cmd ─►  check_request every prompt (all or nothing), then
         ◄── Sink (or ValueError: nothing queued) ──   queue them in their group's admission queue
                                                       admit round-robin across groups while the engine holds
                                                       fewer than max_num_seqs sequences; step()
    async for out in llm.generate(...)  ◄─ outputs ──  each RequestOutput to its Sink's asyncio.Queue
                                                       (loop.call_soon_threadsafe)
    cancelled / client gone: llm.abort(ids) ─ cmd ─►   queued: dropped; admitted: abort_request (blocks freed)

Fairness: the engine's own scheduler is first-come first-served. Requests therefore wait in per-group queues
here (a group is a client: the server uses the OpenAI ``user`` field, else one HTTP request) and are admitted
one group at a time, round-robin, only while the engine holds fewer than ``max_num_seqs`` sequences: a
client's request waits behind at most one request of each other client, never behind all of another
client's batch. NOTE: a request admitted at once when the engine is idle; the cap never stalls a lone request.

The engine is never touched outside its thread (it is single-threaded by contract). A step that raises aborts
the requests it scheduled (the engine's contract) and reports them with the next step as "abort" outputs: their
sinks get the step's error, the other requests go on, and the loop keeps serving.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

logger = logging.getLogger("pagedkv.engine")


class EngineError(RuntimeError):
    """The engine failed while running a request (not the caller's fault)."""


class Sink:
    """Where the outputs of one submission's requests go: ``(prompt_index, RequestOutput)`` items, or
    ``(None, EngineError)``, on an asyncio queue owned by the submitter's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_ids: list = []
        self.submit_time = time.perf_counter()  # when the submission arrived (queue time starts here)

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


@dataclass(slots=True)
class _Pending:
    """A validated request waiting for admission to the engine."""

    request_id: object
    prompt: list
    params: object
    text: str | None
    sink: Sink
    index: int


def _engine_max_num_seqs(engine) -> int:
    config = getattr(engine, "config", None)
    return int(getattr(config, "max_num_seqs", None) or getattr(engine, "max_num_seqs", 256))


class AsyncLLM:
    """Runs ``engine.step()`` in a thread while requests arrive and leave.

    Args:
        engine: an :class:`~pagedkv.engine.LLMEngine` (or anything with ``check_request``, ``add_request``,
            ``abort_request``, ``step`` and ``has_unfinished_requests``).
        max_num_seqs: sequences (branches) the engine may hold before admission waits (default: the engine's
            ``max_num_seqs``: what it can run at once).
    """

    def __init__(self, engine, *, max_num_seqs: int | None = None):
        self.engine = engine
        self.max_num_seqs = max_num_seqs or _engine_max_num_seqs(engine)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict = {}  # request id -> (sink, prompt index); engine thread only (queued and admitted)
        self._groups: OrderedDict = OrderedDict()  # group -> deque[_Pending]; engine thread only
        self._admitted: dict = {}  # request id -> sequences (n) it holds in the engine; engine thread only
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pagedkv-engine-loop", daemon=True)
        self._ids = itertools.count()
        self.num_step_errors = 0
        self._step_error: EngineError | None = None  # the last failed step's, for the requests it aborted

    # ----------------------------------------------------------------------------------- any thread
    def start(self) -> AsyncLLM:
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

    @property
    def num_pending(self) -> int:
        """Requests validated but not yet admitted to the engine (read on the engine thread for an exact count)."""
        return sum(len(q) for q in list(self._groups.values()))

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the engine thread between steps; its result (or exception) in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self.is_alive:
            future.set_exception(EngineError("the engine loop is not running"))
            return future
        self._commands.put((fn, future))
        return future

    async def submit(self, prompts: list[list[int]], params: list, texts=None, *, group=None,
                     request_ids=None) -> Sink:
        """Queue one request per prompt, with ``params[i]`` (all validated first: one bad prompt queues none).

        Args:
            group: the admission group (a client); None: this submission is a group of its own.
            request_ids: one id per prompt (str or int, unique among live requests); default fresh ones.
        Raises:
            ValueError: a request the engine refuses (too long, n too large, a duplicate id...); nothing queued.
        """
        sink = Sink(asyncio.get_running_loop())
        texts = texts or [None] * len(prompts)
        if request_ids is None:
            base = f"req-{next(self._ids)}"
            request_ids = [base] if len(prompts) == 1 else [f"{base}-{i}" for i in range(len(prompts))]
        group = ("submission", id(sink)) if group is None else group
        work = lambda engine: self._queue(engine, sink, group, prompts, params, texts, list(request_ids))  # noqa
        await asyncio.wrap_future(self.call(work))
        return sink

    async def generate(self, prompt_token_ids, params, request_id=None, *, prompt: str | None = None,
                       group=None) -> AsyncIterator:
        """The cumulative outputs of one request as they come (the last one ``finished``); a consumer that stops
        early or is cancelled aborts the request (its blocks are freed).

        Raises:
            ValueError: the engine refuses the request (nothing queued); EngineError: the engine failed it.
        """
        ids = None if request_id is None else [request_id]
        sink = await self.submit([prompt_token_ids], [params], [prompt], group=group, request_ids=ids)
        finished = False
        try:
            while not finished:
                outputs = [item for index, item in await sink.get_all()]
                for item in outputs:
                    if isinstance(item, EngineError):
                        finished = True
                        raise item
                finished = outputs[-1].finished
                yield outputs[-1]
        finally:
            if not finished:
                self.abort(sink.request_ids)

    def abort(self, request_ids) -> None:
        """Abort requests (unknown or finished ids are ignored); thread-safe, returns at once."""
        ids = list(request_ids)
        if ids and self.is_alive:
            self._commands.put((lambda engine: self._abort(engine, ids), None))

    # --------------------------------------------------------------------------------- engine thread
    def _queue(self, engine, sink: Sink, group, prompts, params, texts, request_ids) -> list:
        if len(request_ids) != len(prompts) or len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts, {len(params)} SamplingParams, {len(request_ids)} request ids")
        if len(set(request_ids)) != len(request_ids) or any(r in self._sinks for r in request_ids):
            raise ValueError(f"request ids must be unique among live requests, got {request_ids!r:.200}")
        for prompt, p in zip(prompts, params):
            engine.check_request(prompt, p)
        pending = self._groups.setdefault(group, deque())
        for i, (prompt, p, text, rid) in enumerate(zip(prompts, params, texts, request_ids)):
            pending.append(_Pending(rid, prompt, p, text, sink, i))
            self._sinks[rid] = (sink, i)
        sink.request_ids.extend(request_ids)
        return sink.request_ids

    def _admit(self, engine) -> None:
        """Move queued requests into the engine, one group at a time, while it has room (see the module doc)."""
        held = sum(self._admitted.values())
        while self._groups:
            group, pending = next(iter(self._groups.items()))
            item = pending[0]
            n = getattr(item.params, "n", 1)
            if held and held + n > self.max_num_seqs:
                return
            pending.popleft()
            self._groups.move_to_end(group)
            if not pending:
                del self._groups[group]
            try:
                engine.add_request(item.prompt, item.params, request_id=item.request_id, prompt=item.text)
            except Exception as exc:  # NOTE: validated at submit; the engine changed its mind (e.g. its limits)
                logger.exception("request %s refused at admission", item.request_id)
                self._sinks.pop(item.request_id, None)
                item.sink.put((None, EngineError(f"request refused at admission: {type(exc).__name__}")))
                continue
            self._admitted[item.request_id] = n
            held += n

    def _abort(self, engine, request_ids) -> None:
        ids = set(request_ids)
        for group in list(self._groups):
            kept = deque(p for p in self._groups[group] if p.request_id not in ids)
            if kept:
                self._groups[group] = kept
            else:
                del self._groups[group]
        for request_id in request_ids:
            if self._sinks.pop(request_id, None) is not None and self._admitted.pop(request_id, None) is not None:
                engine.abort_request(request_id)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._run_commands(block=not self.engine.has_unfinished_requests() and not self._groups)
                self._admit(self.engine)
                if not self._stopping.is_set() and self.engine.has_unfinished_requests():
                    self._step()
            except Exception as exc:  # NOTE: the loop must outlive any bug: fail the requests, keep serving
                logger.exception("engine loop iteration failed")
                self._fail_all(EngineError(f"engine loop failed: {type(exc).__name__}"))
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
                self._admitted.pop(out.request_id, None)
                if any(c.finish_reason == "abort" for c in out.outputs):  # not ours: ours left _sinks first
                    sink.put((None, self._step_error or EngineError("the engine aborted the request")))
                    continue
            sink.put((index, out))

    def _fail_all(self, error: EngineError) -> None:
        sinks = {id(s): s for s, _ in self._sinks.values()}
        for request_id in list(self._admitted):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # NOTE: keep aborting the others; the error is already being reported
                logger.exception("abort_request(%r) failed", request_id)
        self._sinks.clear()
        self._admitted.clear()
        self._groups.clear()
        for sink in sinks.values():
            sink.put((None, error))
