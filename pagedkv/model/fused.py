"""Fused elementwise GPU kernels for the decoder (CuPy ``ElementwiseKernel``, and kernels_cu/rms_norm.cu).

Each replaces several array operations (and their launches) of :class:`~pagedkv.model.llama.ElementwiseOps`:

    norm      RMSNorm, one launch of kernels_cu/rms_norm.cu                            instead of ~6
    add_norm  residual add + the RMSNorm after it, one launch of rms_norm.cu's add_rms_norm (bitwise the add
              then the norm; the add is done in place in the residual stream)           instead of 2
    qkv_rope  bias + split q|k|v + rotary embedding, contiguous outputs (1 launch)     instead of ~15
    act       silu(gate) * up over the fused gate|up GEMM output (1 launch)             instead of ~5

:func:`make_fused_ops` compiles them and checks them against the plain operations on random data; any
failure falls back to the plain operations and returns the reason.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..kernels import norm

@lru_cache(maxsize=1)
def _kernels() -> dict:
    """The compiled kernels (CuPy compiles each dtype variant at its first call and caches it)."""
    import cupy as cp

    kernels = {}

    kernels["silu_mul"] = cp.ElementwiseKernel(
        "raw T gu, int32 inter", "T y",
        """const ptrdiff_t row = i / inter, col = i % inter;
           const float g = (float)gu[row * 2 * inter + col];
           const float u = (float)gu[row * 2 * inter + inter + col];
           y = (T)(g / (1.0f + expf(-g)) * u);""", "pagedkv_silu_mul")
    kernels["qkv_rope"] = cp.ElementwiseKernel(
        "raw T qkv, raw T bias, raw I pos, raw float32 cos_t, raw float32 sin_t, int32 nq, int32 nkv, int32 d, "
        "int32 has_bias", "raw T q, raw T k, raw T v",
        """const int half = d / 2, nh = nq + 2 * nkv;
           const int j = i % half;
           const int h = (i / half) % nh;
           const long long t = i / ((long long)half * nh);
           const long long src = (t * nh + h) * d + j;
           float x1 = (float)qkv[src], x2 = (float)qkv[src + half];
           if (has_bias) { x1 += (float)bias[h * d + j]; x2 += (float)bias[h * d + j + half]; }
           if (h < nq + nkv) {
               const long long p = (long long)pos[t] * half + j;
               const float c = cos_t[p], s = sin_t[p];
               const float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
               x1 = y1; x2 = y2;
           }
           if (h < nq) {
               const long long o = (t * nq + h) * d + j; q[o] = (T)x1; q[o + half] = (T)x2;
           } else if (h < nq + nkv) {
               const long long o = (t * nkv + h - nq) * d + j; k[o] = (T)x1; k[o + half] = (T)x2;
           } else {
               const long long o = (t * nkv + h - nq - nkv) * d + j; v[o] = (T)x1; v[o + half] = (T)x2;
           }""", "pagedkv_qkv_rope")
    return kernels


class FusedOps:
    """Same interface and results as ``ElementwiseOps`` (to rounding), fewer launches."""

    def __init__(self, config, rope, dtype):
        import cupy as cp

        self.cp, self.config, self.rope, self.k = cp, config, rope, _kernels()
        self.eps = np.float32(config.rms_norm_eps)
        self.no_bias = cp.zeros(1, dtype=dtype)
        self.fused_add = True  # False: add_norm runs as an add and the norm kernel (its self-check failed)

    def norm(self, x, weight):
        """RMSNorm of ``x`` [rows, hidden]: one launch of ``kernels_cu/rms_norm.cu``."""
        x = self.cp.ascontiguousarray(x)
        out = self.cp.empty_like(x)
        rows, hidden = x.shape
        if rows:
            norm.rms_norm_kernel(x.dtype)((rows,), (norm.NORM_THREADS,), (
                out, x, weight, np.int32(hidden), np.float32(1.0 / hidden), self.eps))
        return out

    def add_norm(self, x, y, weight):
        """``(x + y, norm(x + y))`` for ``x, y`` [rows, hidden]: ``x`` (C-contiguous, the residual stream) is
        overwritten with the sum; one launch of ``kernels_cu/rms_norm.cu`` (``add_rms_norm_*``)."""
        if not self.fused_add or not x.flags.c_contiguous:
            x = x + y
            return x, self.norm(x, weight)
        y = self.cp.ascontiguousarray(y)
        out = self.cp.empty_like(x)
        rows, hidden = x.shape
        if rows:
            norm.add_rms_norm_kernel(x.dtype)(
                (rows,), (norm.NORM_THREADS,), (out, x, y, weight, np.int32(hidden), np.float32(1.0 / hidden),
                                                self.eps))
        return x, out

    def qkv_rope(self, qkv, bias, positions):
        c, cp = self.config, self.cp
        num = qkv.shape[0]
        q = cp.empty((num, c.num_heads, c.head_dim), dtype=qkv.dtype)
        k = cp.empty((num, c.num_kv_heads, c.head_dim), dtype=qkv.dtype)
        v = cp.empty_like(k)
        nh = c.num_heads + 2 * c.num_kv_heads
        self.k["qkv_rope"](qkv, self.no_bias if bias is None else bias, positions, self.rope.cos, self.rope.sin,
                           c.num_heads, c.num_kv_heads, c.head_dim, int(bias is not None), q, k, v,
                           size=num * nh * (c.head_dim // 2))
        return q, k, v

    def act(self, gate_up):
        inter = gate_up.shape[-1] // 2
        out = self.cp.empty((gate_up.shape[0], inter), dtype=gate_up.dtype)
        return self.k["silu_mul"](gate_up, inter, out)


def _self_check(fused: FusedOps, plain, config, dtype) -> None:
    import cupy as cp

    rs = cp.random.RandomState(0)
    tol = 1e-4 if dtype == np.float32 else 3e-2
    num, h = 5, config.hidden_size
    x = rs.standard_normal((num, h), dtype=np.float32).astype(dtype)
    w = (1 + 0.1 * rs.standard_normal(h, dtype=np.float32)).astype(dtype)
    qkv = rs.standard_normal((num, config.qkv_size), dtype=np.float32).astype(dtype)
    bias = rs.standard_normal(config.qkv_size, dtype=np.float32).astype(dtype)
    pos = cp.asarray([0, 3, 7, 1, 2], dtype=cp.int32)
    gu = rs.standard_normal((num, 2 * config.intermediate_size), dtype=np.float32).astype(dtype)
    pairs = [(fused.norm(x, w), plain.norm(x, w)), (fused.act(gu), plain.act(gu))]
    for b in (None, bias):
        pairs += list(zip(fused.qkv_rope(qkv, b, pos), plain.qkv_rope(qkv, b, pos)))
    for i, (a, b) in enumerate(pairs):
        err = float(cp.abs(a.astype(cp.float32) - b.astype(cp.float32)).max())
        if not err <= tol * (1 + float(cp.abs(b.astype(cp.float32)).max())):
            raise AssertionError(f"fused op {i} differs from the plain one by {err}")
    fused.fused_add = _add_norm_is_exact(fused, x, w)


def _add_norm_is_exact(fused: FusedOps, x, w) -> bool:
    """The fused residual add + norm must give the very bits of ``x + y`` then the norm kernel (greedy outputs
    stay those of the unfused decoder); else the pair runs unfused."""
    import cupy as cp

    y = cp.random.RandomState(2).standard_normal(x.shape, dtype=np.float32).astype(x.dtype)
    want_x = x + y
    want_h = fused.norm(want_x, w)
    try:
        got_x, got_h = fused.add_norm(x.copy(), y, w)
    except Exception:  # NOTE: a compile failure: the unfused pair still works
        return False
    return bool(cp.array_equal(got_x, want_x) and cp.array_equal(got_h, want_h))


def make_fused_ops(config, rope, dtype, plain):
    """``(ops, error)``: fused ops if they compile and self-check for ``dtype``, else ``(plain, reason)``."""
    if np.dtype(dtype) not in (np.dtype(np.float16), np.dtype(np.float32)):
        return plain, f"no fused kernels for {np.dtype(dtype)}"
    try:
        fused = FusedOps(config, rope, dtype)
        _self_check(fused, plain, config, np.dtype(dtype))
        return fused, None
    except Exception as exc:  # NOTE: a compile or numeric failure must not stop the engine
        return plain, f"{type(exc).__name__}: {exc}"
