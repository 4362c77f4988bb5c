"""Matrix products on the GPU through cuBLAS called with ctypes, on a cuBLAS handle of our own.

Why not ``x @ w`` on CuPy arrays: CuPy refuses every cuBLAS call while a stream is being captured into a
CUDA graph (its wrapper raises ``NotImplementedError: calling cuBLAS API during stream capture is currently
unsupported``), so a decode step that uses CuPy's matmul can never be replayed as one graph. cuBLAS itself
supports capture when the handle has a user workspace (no allocation can happen inside the capture).

One product, row-major as the model stores it (``w`` is ``[in, out]``, see :mod:`pagedkv.model.weights`)::

    out[M, N] = x[M, K] @ w[K, N]
    cuBLAS is column-major, so it computes out^T[N, M] = op(w)[N, K] @ x^T[K, M]:
      w C-contiguous (a stored matrix)            -> op = N, lda = N
      w F-contiguous (the tied LM head, embed.T)  -> op = T, lda = K
    inputs float16 / bfloat16 / float32, accumulation float32 (CUBLAS_COMPUTE_32F: no TF32)

The library is the one CuPy already loaded into this process (its path read from ``/proc/self/maps``).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import ml_dtypes
import numpy as np

CUDA_R = {np.dtype(np.float32): 0, np.dtype(np.float16): 2, np.dtype(ml_dtypes.bfloat16): 14}
CUBLAS_COMPUTE_32F = 68
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_GEMM_DEFAULT = -1
WORKSPACE_BYTES = 32 << 20
# NOTE: cuBLAS picks an algorithm per shape on the host (~0.1 ms a call for a shape it has not seen); prefill row
# counts vary with every batch, so above PAD_ABOVE rows they are rounded up to a multiple of PAD_ROWS (the extra
# rows are zeros and their outputs are dropped) and cuBLAS's heuristics cache answers instead.
PAD_ROWS, PAD_ABOVE = 64, 256


def _libcublas_path() -> str:
    from cupy_backends.cuda.libs import cublas  # noqa: F401  (loads libcublas into the process)

    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if Path(path).name.startswith("libcublas.so"):
            return path
    raise RuntimeError("libcublas is not mapped into this process")


class CublasGemm:
    """``gemm(x, w) -> x @ w`` for 2-D device arrays, capturable into CUDA graphs."""

    def __init__(self):
        import cupy

        self.cp = cupy
        lib = ctypes.CDLL(_libcublas_path())
        self.lib = lib
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cublasSetStream_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cublasSetWorkspace_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        lib.cublasGemmEx.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.handle = ctypes.c_void_p()
        self._check(lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self.workspace = cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8)
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self._stream = None

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def _bind(self) -> None:
        """Point the handle at the current stream (outside a capture, the first time it is used there).

        NOTE: cublasSetStream resets the workspace to cuBLAS's own pool, so the user workspace follows it.
        """
        stream = self.cp.cuda.get_current_stream().ptr
        if stream != self._stream:
            self._check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream)), "cublasSetStream")
            self._check(self.lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                                       WORKSPACE_BYTES), "cublasSetWorkspace")
            self._stream = stream

    def __call__(self, x, w):
        cp = self.cp
        if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0] or x.dtype != w.dtype:
            raise ValueError(f"gemm needs x [M, K] @ w [K, N] of one dtype, got {x.shape} {x.dtype} @ "
                             f"{w.shape} {w.dtype}")
        x = cp.ascontiguousarray(x)
        m, k = x.shape
        if m > PAD_ABOVE and m % PAD_ROWS:
            padded = cp.zeros((-(-m // PAD_ROWS) * PAD_ROWS, k), dtype=x.dtype)
            padded[:m] = x
            return self(padded, w)[:m]
        n = w.shape[1]
        out = cp.empty((m, n), dtype=x.dtype)
        if m == 0:
            return out
        if w.flags.c_contiguous:
            op, lda = CUBLAS_OP_N, n
        elif w.flags.f_contiguous:
            op, lda = CUBLAS_OP_T, k
        else:
            w, op, lda = cp.ascontiguousarray(w), CUBLAS_OP_N, n
        dt = CUDA_R[np.dtype(x.dtype)]
        self._bind()
        self._check(self.lib.cublasGemmEx(
            self.handle, op, CUBLAS_OP_N, n, m, k, ctypes.byref(self.alpha), w.data.ptr, dt, lda,
            x.data.ptr, dt, k, ctypes.byref(self.beta), out.data.ptr, dt, n, CUBLAS_COMPUTE_32F,
            CUBLAS_GEMM_DEFAULT), "cublasGemmEx")
        return out


def make_gemm(dtype):
    """``(matmul, error)``: the ctypes cuBLAS product if it loads and matches CuPy's ``@`` on random data
    (both layouts of ``w``), else ``(operator.matmul, reason)``."""
    import operator

    try:
        import cupy as cp

        gemm = CublasGemm()
        rs = cp.random.RandomState(1)
        x = rs.standard_normal((37, 96), dtype=np.float32).astype(dtype)
        w = rs.standard_normal((96, 200), dtype=np.float32).astype(dtype)
        wt = cp.ascontiguousarray(w.T).T  # F-contiguous, like a tied LM head
        for weights in (w, wt):
            got, want = gemm(x, weights).astype(cp.float32), (x @ weights).astype(cp.float32)
            err = float(cp.linalg.norm(got - want) / cp.linalg.norm(want))
            if not err < (1e-5 if np.dtype(dtype) == np.float32 else 1e-2):
                raise AssertionError(f"cuBLAS ctypes product differs from cupy.matmul by {err:.3g}")
        return gemm, None
    except Exception as exc:  # NOTE: the model still runs on CuPy's matmul (eager only)
        return operator.matmul, f"{type(exc).__name__}: {exc}"
