"""A step's device inputs as one packed buffer: filled on the host, moved by one host→device copy.

Everything a forward (and the sampler inside it) reads lives in one byte buffer, 8-byte fields first so every
view stays aligned, the block tables last so that a step copies only the rows it uses::

    slot_mapping i64[rows] | logit_rows i64[logits] | seed u64[samples] | step i64[samples] |
    token_ids i32[rows] | src_rows i32[rows] | positions i32[rows] | context_lens i32[tables] |
    query_start_loc i32[seqs + 1] | top_k i32[samples] | temperature f32[samples] | top_p f32[samples] |
    min_p f32[samples] | block_tables i32[tables, blocks]      ◄── upload(n) copies everything up to row n of this

Two layouts: decode (``seqs == 0``: a table and a context length per token row, for ``paged_attention``) and
prefill (a table and a context length per sequence, ``query_start_loc`` splitting the rows among sequences,
for ``prefill_attention``).

``src_rows[i] >= 0``: row ``i``'s token is not known on the host yet (sampled by the step before, still
running); the forward reads it from the device buffer of sampled tokens at that position (:func:`feed_tokens`).

On a GPU the host side is pinned memory, double-buffered: the host fills one while the copy of the other may
still be queued behind a running step (an event per buffer says when its copy has been done). The device side
may be static (a CUDA graph reads it at every replay). On the CPU host and device are the same arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ...backend import array_module
from .sampler import SAMPLING_FIELDS, SamplingTensors

_SAMPLING_8 = tuple((f.name, f.dtype, "samples") for f in SAMPLING_FIELDS if np.dtype(f.dtype).itemsize == 8)
_SAMPLING_4 = tuple((f.name, f.dtype, "samples") for f in SAMPLING_FIELDS if np.dtype(f.dtype).itemsize == 4)
_FIELDS = (("slot_mapping", np.int64, "rows"), ("logit_rows", np.int64, "logits"), *_SAMPLING_8,
           ("token_ids", np.int32, "rows"), ("src_rows", np.int32, "rows"), ("positions", np.int32, "rows"),
           ("context_lens", np.int32, "tables"), ("query_start_loc", np.int32, "seqs1"), *_SAMPLING_4)
H2D, D2H = 1, 2  # cudaMemcpyKind


@dataclass(frozen=True, slots=True)
class InputShape:
    """Capacities: ``rows`` token rows, ``blocks`` block-table width, ``logits`` logit-row indices (prefill
    steps), ``samples`` sampling rows (one per logits row, then the extra branches of ``n > 1`` requests),
    ``seqs`` sequences (0: the decode layout, tables per row)."""

    rows: int
    blocks: int
    logits: int
    samples: int
    seqs: int = 0

    @property
    def tables(self) -> int:
        return self.seqs if self.seqs else self.rows

    def sizes(self) -> dict[str, int]:
        return {"rows": self.rows, "logits": self.logits, "samples": self.samples, "tables": self.tables,
                "seqs1": self.seqs + 1 if self.seqs else 0}


class InputViews:
    """Typed views of one packed buffer (NumPy or CuPy): the fields above, ``block_tables [rows, blocks]`` and
    ``sampling`` (a :class:`SamplingTensors` over the sampling fields)."""

    __slots__ = ("block_tables", "raw", "sampling", *(name for name, _, _ in _FIELDS))

    def __init__(self, raw, shape: InputShape):
        self.raw, offset, sizes = raw, 0, shape.sizes()
        for name, dtype, size in _FIELDS:
            nbytes = np.dtype(dtype).itemsize * sizes[size]
            setattr(self, name, raw[offset:offset + nbytes].view(dtype))
            offset += nbytes
        self.block_tables = raw[offset:offset + 4 * shape.tables * shape.blocks].view(np.int32).reshape(
            shape.tables, shape.blocks)
        self.sampling = SamplingTensors(**{f.name: getattr(self, f.name) for f in SAMPLING_FIELDS})


def table_offset(shape: InputShape) -> int:
    sizes = shape.sizes()
    return sum(np.dtype(dtype).itemsize * sizes[size] for _, dtype, size in _FIELDS)


class StepInputs:
    """Host and device buffers of one input layout (see the module docstring).

    Args:
        shape: the capacities; xp: ``numpy`` (CPU: no copies) or ``cupy``.
        buffers: host buffers taking turns (2 for inputs refilled every step; 1 for a one-off step's).
    Use: ``host = inputs.begin()``, fill ``host``'s views, ``inputs.upload(rows)``; the forward reads
    ``inputs.device``.
    """

    def __init__(self, shape: InputShape, xp, buffers: int = 2):
        self.shape, self.xp = shape, xp
        self.nbytes = table_offset(shape) + 4 * shape.tables * shape.blocks
        self.on_gpu = xp is not np
        if self.on_gpu:
            import cupyx

            self._hosts = [InputViews(cupyx.empty_pinned(self.nbytes, dtype=np.uint8), shape) for _ in range(buffers)]
            self._copied = [None] * buffers  # event after each host buffer's last copy
            self.device = InputViews(xp.zeros(self.nbytes, dtype=xp.uint8), shape)
        else:
            self._hosts = [InputViews(np.zeros(self.nbytes, dtype=np.uint8), shape)]
            self.device = self._hosts[0]
        for views in self._hosts:
            _reset(views)
        if self.on_gpu:
            _reset(self.device)
        self._turn = 0
        self.host = self._hosts[0]

    def begin(self) -> InputViews:
        """The host buffer to fill for the next upload (waits until its previous copy has been done)."""
        self._turn = (self._turn + 1) % len(self._hosts)
        self.host = self._hosts[self._turn]
        if self.on_gpu and self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()
        return self.host

    def reset(self) -> None:
        """Every row of the device side becomes padding (before capturing graphs on it)."""
        _reset(self.begin())
        self.upload(self.shape.tables)

    def upload(self, table_rows: int) -> int:
        """One host→device copy (current stream) of every field and the first ``table_rows`` block-table rows;
        returns the bytes copied (0 on the CPU)."""
        if not self.on_gpu:
            return 0
        cp = self.xp
        nbytes = table_offset(self.shape) + 4 * table_rows * self.shape.blocks
        stream = cp.cuda.get_current_stream()
        cp.cuda.runtime.memcpyAsync(self.device.raw.data.ptr, self.host.raw.ctypes.data, nbytes, H2D, stream.ptr)
        event = cp.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        self._copied[self._turn] = event
        return nbytes


def _reset(views: InputViews) -> None:
    """Every row padding: no slot, context 1, greedy sampling (so stale rows are always harmless)."""
    views.raw[...] = 0
    views.slot_mapping[...] = -1
    views.src_rows[...] = -1
    views.context_lens[...] = 1
    views.sampling.clear()


class HostCopy:
    """Device→host copies of one step into pinned memory, all on the current stream, and one event after them.

    On the CPU (NumPy arrays) the arrays are returned as they are.
    """

    def __init__(self, xp):
        self.xp, self.on_gpu, self.event = xp, xp is not np, None

    def __call__(self, array, out: np.ndarray | None = None) -> np.ndarray:
        if not self.on_gpu:
            return array
        import cupyx

        array = self.xp.ascontiguousarray(array)
        if out is None:
            out = cupyx.empty_pinned(array.shape, dtype=array.dtype)
        if array.nbytes:
            stream = self.xp.cuda.get_current_stream()
            self.xp.cuda.runtime.memcpyAsync(out.ctypes.data, array.data.ptr, array.nbytes, D2H, stream.ptr)
        return out

    def record(self) -> None:
        if self.on_gpu:
            self.event = self.xp.cuda.Event(block=False, disable_timing=True)
            self.event.record(self.xp.cuda.get_current_stream())

    def wait(self) -> None:
        """Block until every copy issued before :meth:`record` has landed."""
        if self.event is not None:
            self.event.synchronize()


def feed_tokens(token_ids, src_rows, sampled) -> None:
    """``token_ids[i] = sampled[src_rows[i]]`` where ``src_rows[i] >= 0`` (in place; one launch on a GPU)."""
    if array_module(token_ids) is np:
        take = src_rows >= 0
        if take.any():
            token_ids[take] = sampled[src_rows[take]]
        return
    if token_ids.size:
        _feed_kernel()(src_rows, sampled, token_ids, size=token_ids.size)


@lru_cache(maxsize=1)
def _feed_kernel():
    import cupy as cp

    return cp.ElementwiseKernel("raw int32 src, raw int32 sampled", "raw int32 tok",
                                "const int s = src[i]; if (s >= 0) tok[i] = sampled[s];", "pagedkv_feed_tokens")
