"""Array placement: CuPy on a usable CUDA device, NumPy otherwise.

The choice is made once, when a cache or a model is built, through ``device``:

- ``"auto"``: CuPy when ``import cupy`` works *and* a CUDA device answers, else NumPy;
- ``"gpu"``:  CuPy, or a ``RuntimeError`` naming why no GPU is usable;
- ``"cpu"``:  NumPy.

``import pagedkv`` never needs CuPy: it is imported here lazily, on first use.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import ml_dtypes
import numpy as np

DEVICES = ("auto", "gpu", "cpu")


@dataclass(frozen=True, slots=True)
class Backend:
    """The array module in use: ``xp`` is ``numpy`` or ``cupy``; ``name`` is ``"cpu"`` or ``"gpu"``."""

    name: str
    xp: Any

    @property
    def is_gpu(self) -> bool:
        return self.name == "gpu"


@lru_cache(maxsize=1)
def gpu_status() -> tuple[bool, str]:
    """Return ``(usable, reason)``: whether CuPy imports and a CUDA device answers, and why not."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising anything at import
        return False, f"cupy is not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"cupy found no usable CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, "cupy found 0 CUDA devices"
    try:
        cupy.zeros(1).sum().item()  # a real launch: a driver/toolkit mismatch fails here
    except Exception as exc:
        return False, f"a test launch on the CUDA device failed ({type(exc).__name__}: {exc})"
    return True, f"{count} CUDA device(s)"


def get_backend(device: str = "auto") -> Backend:
    """Resolve ``device`` (``"auto" | "gpu" | "cpu"``) to a :class:`Backend`."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return Backend("cpu", np)
    usable, reason = gpu_status()
    if usable:
        import cupy

        return Backend("gpu", cupy)
    if device == "gpu":
        raise RuntimeError(f"device='gpu' was requested but no GPU is usable: {reason}")
    return Backend("cpu", np)


def is_gpu_array(a: Any) -> bool:
    """True for a CuPy array or any object exposing ``__cuda_array_interface__`` (a CUDA torch tensor)."""
    return hasattr(a, "__cuda_array_interface__")


def array_module(a: Any) -> Any:
    """``cupy`` for device arrays, ``numpy`` for everything else."""
    if is_gpu_array(a):
        import cupy

        return cupy
    return np


def to_numpy(a: Any) -> np.ndarray:
    """Copy a device array to the host (no copy for NumPy input)."""
    if is_gpu_array(a):
        import cupy

        return cupy.asnumpy(cupy.asarray(a))
    return np.asarray(a)


SUPPORTED_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32))


def dtype_of(name: Any) -> np.dtype:
    """Parse a dtype (``"float16"``, ``"bfloat16"``, ``"float32"`` or a dtype object); others raise ``ValueError``.

    bfloat16 is ``ml_dtypes.bfloat16`` on the host; CuPy (>= 14) uses the same NumPy dtype object.
    """
    if name is None:
        raise ValueError("dtype must be float16, bfloat16 or float32, got None")
    try:
        dt = np.dtype(ml_dtypes.bfloat16) if str(name) in ("bfloat16", "bf16") else np.dtype(name)
    except TypeError as exc:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {name!r}") from exc
    if dt not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dt}")
    return dt
