"""``LLM.stream``: text deltas of one request as its tokens arrive; every stream ends (issue 21).

Each stream owns its request's outputs. Stepping the engine advances every running request, so a stream
that steps routes the outputs of other streams' requests into their mailboxes (:class:`Mailboxes`); a stream
reads its own mailbox before it steps. A stream ends when its request finished, or when the engine holds
nothing for it any more (never a spin). Closing a stream (``close()``, ``break`` in a ``for`` loop) or
letting the garbage collector take it aborts its request and frees its blocks, also when it was never
iterated; the engine is idle once every stream ended::

    a = llm.stream("one"); b = llm.stream("two")
    "".join(a)        # steps both requests; b's outputs wait in b's mailbox
    "".join(b)        # reads its mailbox, then steps until its request finished
"""
from __future__ import annotations

import weakref


class Mailboxes:
    """The newest undelivered output of each open stream's request (outputs are cumulative: newest wins)."""

    def __init__(self):
        self.latest: dict = {}
        self.open: set = set()

    def route(self, outputs) -> None:
        for out in outputs:
            if out.request_id in self.open:
                self.latest[out.request_id] = out


class Stream:
    """An iterator of text deltas: ``str`` for ``n == 1``, ``(index, str)`` tuples for ``n > 1`` (a branch's
    deltas arrive in order; branches interleave as their tokens come).

    Args:
        engine: the :class:`~pagedkv.engine.LLMEngine` holding the request; mailboxes: the LLM's.
    """

    def __init__(self, engine, mailboxes: Mailboxes, request_id, n: int):
        self.engine, self.mailboxes, self.request_id, self.n = engine, mailboxes, request_id, n
        self.sent = [0] * n
        self.pending: list = []
        self.finished = False
        mailboxes.open.add(request_id)
        # NOTE: the finalizer holds the engine, not the stream: it runs when the stream is collected
        self._finalizer = weakref.finalize(self, _abandon, engine, mailboxes, request_id)

    def __iter__(self):
        return self

    def __next__(self):
        while not self.pending:
            if self.finished:
                raise StopIteration
            self._advance()
        return self.pending.pop(0)

    def _advance(self) -> None:
        with self.engine.serial.lock:
            out = self.mailboxes.latest.pop(self.request_id, None)
            if out is None:
                if not self.engine.has_unfinished_requests():
                    self._end()  # nothing holds the request any more (aborted elsewhere): end, never spin
                    return
                self.mailboxes.route(self.engine.step())
                out = self.mailboxes.latest.pop(self.request_id, None)
        if out is not None:
            self._deliver(out)

    def _deliver(self, out) -> None:
        for c in out.outputs:
            if len(c.text) > self.sent[c.index]:
                delta = c.text[self.sent[c.index]:]
                self.sent[c.index] = len(c.text)
                self.pending.append(delta if self.n == 1 else (c.index, delta))
        if out.finished:
            self._end()

    def _end(self) -> None:
        self.finished = True
        self._finalizer.detach()
        self.mailboxes.open.discard(self.request_id)
        self.mailboxes.latest.pop(self.request_id, None)

    def close(self) -> None:
        """Stop reading: the request is aborted (its blocks freed) unless it already finished."""
        if not self.finished:
            self._end()
            self.engine.abort_request(self.request_id)
        self.pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _abandon(engine, mailboxes: Mailboxes, request_id) -> None:
    """A stream was collected before its end: forget its mailbox, abort its request (deferred if busy)."""
    mailboxes.open.discard(request_id)
    mailboxes.latest.pop(request_id, None)
    engine.abort_request_soon(request_id)
