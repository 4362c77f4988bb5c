"""The model's fused RMSNorm kernels: ``kernels_cu/rms_norm.cu`` (the norm, and the norm fused with the residual
add before it).

Both launch one thread block of :data:`NORM_THREADS` per row of ``x`` [rows, hidden].
"""
from __future__ import annotations

from .compile import DT_SUFFIXES, dt_code, load_function

NORM_THREADS = 256  # PAGEDKV_NORM_THREADS in rms_norm.cu


def rms_norm_kernel(dtype):
    """The ``rms_norm_<f32|f16|bf16>`` kernel of ``kernels_cu/rms_norm.cu`` for ``dtype``."""
    return load_function("rms_norm.cu", f"rms_norm_{DT_SUFFIXES[dt_code(dtype)]}")


def add_rms_norm_kernel(dtype):
    """The ``add_rms_norm_<f32|f16|bf16>`` kernel of ``kernels_cu/rms_norm.cu`` for ``dtype``."""
    return load_function("rms_norm.cu", f"add_rms_norm_{DT_SUFFIXES[dt_code(dtype)]}")
