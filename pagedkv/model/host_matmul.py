"""Matrix products of the CPU forward: float32 BLAS (fast) or float64 accumulation (batch-invariant oracle).

    "float64"  ``x @ w`` accumulated in float64 and rounded once to ``x``'s dtype: a row's result does not depend
               on the batch's row count (the engine's default: its "identical outputs whatever the schedule"
               promise and the tests' oracle rest on it). Converts both operands every call.
    "float32"  NumPy's float32 BLAS (sgemm / sgemv); bfloat16 / float16 weights are converted to a float32 copy
               once, at their first use. ~10x fewer bytes moved than "float64" on large weights.

NOTE: a float32 BLAS product may round a row differently with the batch's row count (blocking; gemv for one
row), so a greedy token can differ between schedules in rare near-ties; ``LLM`` chooses "float32" for speed,
``LLMEngine`` keeps "float64" unless told otherwise.
"""
from __future__ import annotations

import numpy as np

HOST_MATMULS = ("float64", "float32")


def float64_matmul(x, w):
    """``x @ w`` accumulated in float64, rounded to ``x``'s dtype (see the module docstring)."""
    return (x.astype(np.float64) @ w.astype(np.float64)).astype(x.dtype)


class Float32Matmul:
    """``x @ w`` in float32 BLAS, rounded to ``x``'s dtype; keeps a float32 copy of each non-float32 weight."""

    def __init__(self):
        self._copies: dict[int, tuple[object, np.ndarray]] = {}  # id(w) -> (w kept alive, its float32 copy)

    def weight(self, w) -> np.ndarray:
        if w.dtype == np.float32:
            return w
        entry = self._copies.get(id(w))
        if entry is None or entry[0] is not w:
            entry = (w, np.ascontiguousarray(w, dtype=np.float32) if w.flags.c_contiguous else
                     np.asarray(w, dtype=np.float32))
            self._copies[id(w)] = entry
        return entry[1]

    def __call__(self, x, w):
        out = x.astype(np.float32, copy=False) @ self.weight(w)
        return out if x.dtype == np.float32 else out.astype(x.dtype)


def make_host_matmul(kind: str):
    """The CPU matmul named ``kind`` (one of :data:`HOST_MATMULS`)."""
    if kind == "float64":
        return float64_matmul
    if kind == "float32":
        return Float32Matmul()
    raise ValueError(f"host_matmul must be one of {HOST_MATMULS}, got {kind!r}")
