"""Batched sampling on the device (``kernels_cu/sampling.cu``) and the same algorithm in NumPy (CPU path).

Each row of ``logits [B, V]`` draws one token with its own parameters and its own counter-based generator,
so a branch's token depends only on its logits, its parameters, its seed and its step — never on the batch:

    temperature 0                 argmax (lowest index among equal maxima)
    otherwise (vLLM's order)      x = float32 logits, z = x * float32(1 / T), m = max(z)
      1. min-p                    A = {i : z_i - m >= log(min_p)}           (p_i >= min_p * p_max)
      2. top-k                    A &= {i : x_i >= k-th largest x}          (0 < top_k < V)
      3. top-p (renormalised)     keep i in A iff the mass of A strictly above x_i < top_p * mass(A);
                                  mass = round(exp(z - m) * 2^40) in integers, so sums are exact
      4. draw                     argmax over kept i of z_i + Gumbel(seed, step, i)  ==  softmax(z) over kept
    Gumbel(seed, step, i) = -log(-log(u)), u from word i % 4 of Philox4x32-10(counter (i // 4, step), key seed).

Every filter keeps or drops all copies of a value together (ties), so ``top_k`` may keep more than ``k``
tokens and ``top_p`` keeps the whole tie group at its edge. Logits must not be NaN.

Model runner (CUDA graphs): keep one host and one device :class:`SamplingTensors` of ``max_num_seqs`` rows
and one device ``int32 [max_num_seqs]`` output; capture ``sample(logits[:bucket], device, out=out[:bucket])``
after the LM head; before each replay ``host.fill(rows)`` then ``host.copy_to(device)`` (one host→device
copy of 32 bytes a row; padding rows become greedy). ``rows[i] = (params, seed, step)``: ``seed`` from
:func:`branch_seed` once per branch, ``step`` = tokens that branch has generated so far.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Any, Callable, Sequence

import ml_dtypes
import numpy as np

from ...backend import array_module
from ...sampling_params import SamplingParams

THREADS = 1024  # PAGEDKV_SAMPLE_THREADS in sampling.cu
MASS_SCALE = np.float32(2.0**40)  # PAGEDKV_MASS_SCALE


@dataclass(frozen=True, slots=True)
class SamplingField:
    """One per-row sampling parameter: its name, dtype, the value that turns it off (greedy and padding rows),
    and how a request's :class:`SamplingParams` gives it (None: per branch, filled by the runner)."""

    name: str
    dtype: type
    off: int | float = 0
    of_params: Callable[[SamplingParams], int | float] | None = None


# NOTE: the one declaration of the sampling fields: SamplingTensors, the runner's step inputs, its per-sequence
# rows and the batch layout iterate it (64-bit fields first, so that every view of a packed buffer is aligned)
SAMPLING_FIELDS = (SamplingField("seed", np.uint64), SamplingField("step", np.int64),
                   SamplingField("temperature", np.float32, 0, attrgetter("temperature")),
                   SamplingField("top_k", np.int32, 0, lambda p: min(p.top_k, 2**31 - 1)),  # top_k >= -1
                   SamplingField("top_p", np.float32, 1, attrgetter("top_p")),
                   SamplingField("min_p", np.float32, 0, attrgetter("min_p")),
                   # logits processing (pagedkv.engine.runner.logits_process; flags 0: a plain row): the runner's
                   SamplingField("flags", np.int32), SamplingField("proc_row", np.int32),
                   SamplingField("state_row", np.int32), SamplingField("mask_row", np.int32))
PARAM_FIELDS = tuple(f for f in SAMPLING_FIELDS if f.of_params is not None)  # the request's, not the branch's
_LAYOUT = tuple((f.name, f.dtype) for f in SAMPLING_FIELDS)
ROW_BYTES = sum(np.dtype(dt).itemsize for _, dt in _LAYOUT)
_SUFFIX = {0: "f32", 1: "f16", 2: "bf16"}
_MASK32 = np.uint64(0xFFFFFFFF)


def branch_seed(params: SamplingParams, index: int, rng: np.random.Generator) -> int:
    """The seed of branch ``index``: ``params.branch_seed(index)``, or a fresh one from ``rng`` when the
    request has no seed. Compute it once per branch (it is not cheap) and keep it with the branch."""
    seed = params.branch_seed(index)
    return int(rng.integers(0, 2**63)) if seed is None else seed


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling parameters as fixed-shape arrays (NumPy or CuPy), ``[num_rows]`` each.

    ``temperature`` f32 (0: greedy), ``top_k`` i32 (<= 0 or >= V: off), ``top_p`` f32 (1: off), ``min_p`` f32
    (0: off), ``seed`` u64 (the branch's seed), ``step`` i64 (the branch's generated-token count); ``flags``,
    ``proc_row``, ``state_row``, ``mask_row`` i32: logits processing (zeros when not given). Made by
    :meth:`allocate`, the arrays are views of one byte buffer ``raw`` (SAMPLING_FIELDS' order, each ``num_rows``
    long), so :meth:`copy_to` moves them all in one copy.
    """

    temperature: Any
    top_k: Any
    top_p: Any
    min_p: Any
    seed: Any
    step: Any
    flags: Any = None
    proc_row: Any = None
    state_row: Any = None
    mask_row: Any = None
    raw: Any = field(default=None, repr=False)

    def __post_init__(self):
        n = self.temperature.shape[0] if getattr(self.temperature, "ndim", 0) == 1 else None
        for name, dt in _LAYOUT:
            if getattr(self, name) is None:
                setattr(self, name, array_module(self.temperature).zeros(n or 0, dtype=dt))
        for name, dt in _LAYOUT:
            a = getattr(self, name)
            if getattr(a, "ndim", 0) != 1 or a.shape[0] != n or a.dtype != dt or not a.flags.c_contiguous:
                raise ValueError(f"SamplingTensors.{name} must be a contiguous 1-D {np.dtype(dt)} array of the "
                                 f"same length as temperature, got {getattr(a, 'dtype', type(a))} "
                                 f"{getattr(a, 'shape', None)}")

    @classmethod
    def allocate(cls, capacity: int, xp=np) -> SamplingTensors:
        """``capacity`` greedy rows in one buffer of ``xp`` (``numpy`` for the host side, ``cupy`` for the device)."""
        if not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        return cls.on_buffer(xp.zeros(ROW_BYTES * int(capacity), dtype=xp.uint8))

    @classmethod
    def on_buffer(cls, raw) -> SamplingTensors:
        """Rows (all off) over the byte buffer ``raw`` (``ROW_BYTES`` a row; e.g. pinned host memory)."""
        capacity = raw.shape[0] // ROW_BYTES
        views, offset = {}, 0
        for name, dt in _LAYOUT:
            nbytes = np.dtype(dt).itemsize * int(capacity)
            views[name] = raw[offset:offset + nbytes].view(dt)
            offset += nbytes
        tensors = cls(**views, raw=raw)
        tensors.clear()
        return tensors

    @classmethod
    def from_rows(cls, rows: Sequence[tuple], xp=np) -> SamplingTensors:
        """Tensors of exactly ``len(rows)`` rows (see :meth:`fill`), on ``xp``'s side."""
        host = cls.allocate(max(len(rows), 1))
        host.fill(rows)
        if xp is np:
            return host
        device = cls.allocate(host.num_rows, xp)
        host.copy_to(device)
        return device

    @property
    def num_rows(self) -> int:
        return int(self.temperature.shape[0])

    def clear(self) -> None:
        """Every row off: greedy, seed and step 0."""
        for f in SAMPLING_FIELDS:
            getattr(self, f.name)[...] = f.off

    def fill(self, rows: Sequence[tuple]) -> None:
        """Host side: row i from ``rows[i] = (params, seed, step)``; rows past ``len(rows)`` become greedy.

        ``params`` a :class:`SamplingParams`, ``seed`` an int in ``[0, 2**64)`` (see :func:`branch_seed`),
        ``step`` an int >= 0. Everything is checked before anything is written.
        """
        if self.raw is None or array_module(self.raw) is not np:
            raise ValueError("fill() writes host tensors (SamplingTensors.allocate(n)); copy_to() the device ones")
        n = len(rows)
        if n > self.num_rows:
            raise ValueError(f"{n} rows do not fit SamplingTensors of {self.num_rows} rows")
        params = list(map(itemgetter(0), rows))
        if not set(map(type, params)) <= {SamplingParams}:
            raise ValueError("each row must be (SamplingParams, seed, step)")
        try:
            seed = np.fromiter(map(itemgetter(1), rows), dtype=np.uint64, count=n)
            step = np.fromiter(map(itemgetter(2), rows), dtype=np.int64, count=n)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"seeds must be ints in [0, 2**64) and steps ints in [0, 2**63): {exc}") from None
        if n and step.min() < 0:
            raise ValueError(f"step must be >= 0, got {int(step.min())}")
        self.clear()
        self.seed[:n], self.step[:n] = seed, step
        for f in PARAM_FIELDS:
            getattr(self, f.name)[:n] = np.fromiter(map(f.of_params, params), f.dtype, n)

    def copy_to(self, other: SamplingTensors) -> None:
        """Copy every row into ``other`` (host→device: one copy on the current stream)."""
        if self.raw is None or other.raw is None or self.raw.shape != other.raw.shape:
            raise ValueError("copy_to needs two SamplingTensors made by allocate() with the same capacity")
        src_host, dst_host = array_module(self.raw) is np, array_module(other.raw) is np
        if dst_host:
            other.raw[...] = self.raw if src_host else self.raw.get()
        elif src_host:
            other.raw.set(self.raw)
        else:
            other.raw[...] = self.raw

def sample(logits, tensors: SamplingTensors, out=None, *, logits_dtype=None, state=None, processed=None):
    """One token per row: ``int32 [B]``. ``logits [B, V]`` float32/float16/bfloat16 (a uint16 view with
    ``logits_dtype="bfloat16"``), unit stride along V; rows 0..B-1 of ``tensors`` are used.

    ``state``: a :class:`~pagedkv.engine.runner.logits_process.LogitsState` (allocated): rows with
    ``flags & PROCESS`` are first processed (penalties, masks) into ``processed`` (default ``state.processed``)
    and sample from there.

    CuPy input: one kernel launch on the current stream, no host synchronisation, no allocation when ``out``
    (``int32 [B]``, contiguous) is given — capturable in a CUDA graph. NumPy input: the same algorithm on the host.
    """
    xp = array_module(logits)
    dt = _dt_code(logits, logits_dtype)
    if logits.ndim != 2 or logits.shape[1] < 1 or logits.shape[1] >= 2**31 - 8:
        raise ValueError(f"logits must be [B, V] with 1 <= V < 2**31 - 8, got shape {logits.shape}")
    num_rows, vocab = logits.shape
    if tensors.num_rows < num_rows:
        raise ValueError(f"tensors have {tensors.num_rows} rows, logits {num_rows}")
    if array_module(tensors.temperature) is not xp:
        raise ValueError("logits and tensors must be on the same side (both NumPy or both CuPy)")
    if out is None:
        out = xp.empty(num_rows, dtype=xp.int32)
    elif out.shape != (num_rows,) or out.dtype != np.int32 or not out.flags.c_contiguous or array_module(out) is not xp:
        raise ValueError(f"out must be a contiguous int32 [{num_rows}] array beside logits, "
                         f"got {out.dtype} {out.shape}")
    if num_rows == 0:
        return out
    if state is not None and not state.allocated:
        state = None
    if state is not None:
        from .logits_process import process

        process(logits if xp is not np else _as_float32(logits, dt), tensors, state, dt, processed)
        processed = state.processed if processed is None else processed
    if xp is np:
        x = _as_float32(logits, dt)
        if state is not None and (tensors.flags[:num_rows] & 1).any():
            x = x.copy()
            rows = np.flatnonzero(tensors.flags[:num_rows] & 1)
            x[rows] = processed[tensors.proc_row[rows]]
        out[...] = _sample_numpy(x, tensors)
        return out
    _launch(logits, tensors, out, dt, vocab, processed if state is not None else None)
    return out


def _dt_code(logits, logits_dtype) -> int:
    from ...kernels.compile import dt_code

    return dt_code(logits.dtype, logits_dtype)


def _launch(logits, tensors, out, dt, vocab, processed=None) -> None:
    import cupy

    from ...kernels.compile import load_function

    item = logits.itemsize
    row_stride = logits.strides[0] // item if logits.shape[0] > 1 else vocab
    if logits.strides[1] != item or logits.strides[0] % item or (logits.shape[0] > 1 and row_stride < vocab):
        raise ValueError(f"logits must have unit stride along V and rows >= V apart, got strides {logits.strides}")
    vec = int(logits.data.ptr % 16 == 0 and (row_stride * item) % 16 == 0)
    kernel = load_function("sampling.cu", f"sample_{_SUFFIX[dt]}")
    t = tensors
    proc_args = (processed, t.flags, t.proc_row, cupy.int32(vocab % 4 == 0)) if processed is not None else \
        (cupy.uint64(0), cupy.uint64(0), cupy.uint64(0), cupy.int32(0))
    kernel((logits.shape[0],), (THREADS,), (out, logits, cupy.int64(row_stride), cupy.int32(vocab), cupy.int32(vec),
                                            t.temperature, t.top_k, t.top_p, t.min_p, t.seed, t.step, *proc_args))


def _as_float32(logits, dt: int):
    """float32 values of float32 / float16 / bfloat16 (or its uint16 view) logits, on their side."""
    xp = array_module(logits)
    if dt == 2:
        bits = logits.view(xp.uint16) if logits.dtype != np.uint16 else logits
        return (bits.astype(xp.uint32) << 16).view(xp.float32)
    return logits.astype(xp.float32, copy=False)


# ---- the NumPy path: the kernel's algorithm, step for step ----------------------------------------------

def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 (Random123) on broadcastable uint32 counter words and key words; four uint32 words."""
    c0, c1, c2, c3, k0, k1 = (np.asarray(a, dtype=np.uint64) for a in (c0, c1, c2, c3, k0, k1))
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _MASK32, (k1 + np.uint64(0xBB67AE85)) & _MASK32
        p0, p1 = c0 * m0, c2 * m1
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def gumbel_noise(seed: int, step: int, vocab: int) -> np.ndarray:
    """float32 [vocab]: the kernel's Gumbel noise of every token for (seed, step)."""
    seed, step = np.uint64(seed), np.uint64(step)
    words = philox4x32_10(np.arange(-(-vocab // 4), dtype=np.uint64), step & _MASK32, step >> np.uint64(32), 0,
                          seed & _MASK32, seed >> np.uint64(32))
    w = np.stack(words, axis=1).reshape(-1)[:vocab]
    u = (((w >> np.uint32(9)) << np.uint32(1)) | np.uint32(1)).astype(np.float32) * np.float32(2.0**-24)
    return -np.log(-np.log(u))


def _sample_numpy(x: np.ndarray, t: SamplingTensors) -> np.ndarray:
    return np.array([_sample_row(x[i], t.temperature[i], int(t.top_k[i]), t.top_p[i], t.min_p[i], int(t.seed[i]),
                                 int(t.step[i])) for i in range(x.shape[0])], dtype=np.int32)


def _sample_row(x: np.ndarray, temperature, top_k: int, top_p, min_p, seed: int, step: int) -> int:
    if not temperature > 0:
        return int(np.argmax(x))
    z = x * (np.float32(1) / np.float32(temperature))
    kept = np.flatnonzero(kept_mask(x, temperature, top_k, top_p, min_p))
    if kept.size == 0:
        return 0
    return int(kept[np.argmax((z + gumbel_noise(seed, step, x.size))[kept])])


def kept_mask(x: np.ndarray, temperature, top_k: int, top_p, min_p) -> np.ndarray:
    """bool [V]: the tokens of float32 logits ``x`` [V] that the filters keep (temperature > 0)."""
    vocab = x.size
    if not (0 < top_k < vocab or top_p < 1 or min_p > 0):
        return np.ones(vocab, dtype=bool)
    inv_t = np.float32(1) / np.float32(temperature)
    d = x * inv_t - np.max(x) * inv_t
    keep = d >= (np.log(np.float32(min_p)) if min_p > 0 else -np.inf)
    if 0 < top_k < vocab:
        keep &= x >= np.partition(x, vocab - top_k)[vocab - top_k]
    if top_p < 1:
        keep &= x >= top_p_threshold(x[keep], d[keep], top_p)
    return keep


def top_p_threshold(x: np.ndarray, d: np.ndarray, top_p) -> np.float32:
    """The smallest value of ``x`` (the set A) whose strictly-larger mass is < ceil(S * top_p), S the mass of A;
    ``d = z - max(z)`` of the same tokens. Masses are the kernel's integers ``rint(exp(d) * 2^40)``."""
    q = np.rint(np.exp(d) * MASS_SCALE).astype(np.uint64)
    target = int(np.ceil(np.float64(q.sum(dtype=np.uint64)) * np.float64(np.float32(top_p))))
    order = np.argsort(-x, kind="stable")
    xs, qs = x[order], q[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # one group per value (-0.0 == +0.0)
    mass = np.add.reduceat(qs, starts)
    above = np.cumsum(mass) - mass
    return xs[starts[np.count_nonzero(above < target) - 1]]


# ---- log-probabilities ----------------------------------------------------------------------------------

def logprobs(logits, token_ids, num_top: int, *, logits_dtype=None):
    """Log-probabilities under the model's distribution (before temperature and filters), eager.

    Args:
        logits: [B, V] on either side; token_ids: [B] ints (not range-checked on the device);
        num_top: how many of each row's most likely tokens to return (0..V).
    Returns:
        (sampled float32 [B], top_ids int32 [B, num_top], top_logprobs float32 [B, num_top]), most likely
        first; the sums are float64.
    """
    xp = array_module(logits)
    x = _as_float32(logits, _dt_code(logits, logits_dtype))
    num_rows, vocab = x.shape
    ids = xp.asarray(token_ids)
    if ids.shape != (num_rows,):
        raise ValueError(f"token_ids must have shape ({num_rows},), got {ids.shape}")
    if not isinstance(num_top, (int, np.integer)) or not 0 <= num_top <= vocab:
        raise ValueError(f"num_top must be an int in [0, {vocab}], got {num_top!r}")
    m = x.max(axis=1, keepdims=True)
    lse = (m.astype(xp.float64) + xp.log(xp.exp(x - m).sum(axis=1, keepdims=True, dtype=xp.float64)))
    picked = xp.take_along_axis(x, ids.astype(xp.int64)[:, None], axis=1)
    sampled = (picked - lse)[:, 0].astype(xp.float32)
    if num_top == 0:
        return sampled, xp.empty((num_rows, 0), dtype=xp.int32), xp.empty((num_rows, 0), dtype=xp.float32)
    top = xp.argpartition(-x, num_top - 1, axis=1)[:, :num_top]
    values = xp.take_along_axis(x, top, axis=1)
    order = xp.argsort(-values, axis=1)
    top_ids = xp.take_along_axis(top, order, axis=1).astype(xp.int32)
    top_lp = (xp.take_along_axis(values, order, axis=1) - lse).astype(xp.float32)
    return sampled, top_ids, top_lp
