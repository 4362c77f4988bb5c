"""The engine's thread model: every public call holds one reentrant lock, so callers on several threads are
served one at a time (never interleaved inside a step); aborts requested from a finalizer are deferred.

``@serialized`` wraps a method of an object with ``lock`` (a ``threading.RLock``), ``pending_aborts`` (a deque)
and ``abort_request``. A call drains ``pending_aborts`` first (ids queued by :func:`abort_soon`, e.g. by a
stream collected by the garbage collector, which may run on any thread at any bytecode).
"""
from __future__ import annotations

import functools
import threading
from collections import deque


class Serialization:
    """The lock, the depth of calls holding it on its owning thread, and the aborts waiting for it."""

    def __init__(self):
        self.lock = threading.RLock()
        self.depth = 0
        self.pending_aborts: deque = deque()


def serialized(method):
    """Run ``method`` under ``self.serial.lock``; the outermost call first applies deferred aborts."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        serial = self.serial
        with serial.lock:
            serial.depth += 1
            try:
                if serial.depth == 1:
                    drain(self)
                return method(self, *args, **kwargs)
            finally:
                serial.depth -= 1
    return wrapper


def drain(engine) -> None:
    """Abort every request queued by :func:`abort_soon` (call with the lock held, outside any step)."""
    pending = engine.serial.pending_aborts
    while pending:
        engine.abort_request(pending.popleft())  # nested: the lock is reentrant


def abort_soon(engine, request_id) -> None:
    """Abort ``request_id`` now if the lock is free (and not held by this very thread inside a call), else at
    the start of the engine's next call. Safe from ``__del__`` and finalizers."""
    serial = engine.serial
    serial.pending_aborts.append(request_id)
    if serial.lock.acquire(blocking=False):
        try:
            if serial.depth == 0:
                serial.depth += 1
                try:
                    drain(engine)
                finally:
                    serial.depth -= 1
        finally:
            serial.lock.release()
