"""fp8 KV cache formats on the host: names, validation, quantize / dequantize (the kernels' exact twins).

A KV cache in fp8 keeps the pool layout ``[num_layers, num_blocks, num_kv_heads, block_size, head_dim]``
with element dtype **uint8**: the raw fp8 bytes (NumPy and CuPy have no fp8 dtype; ``ml_dtypes`` views the
same bytes on the host). Per layer a K and a V scale (float32, finite, > 0)::

    stored     q  = fp8(sat(float32(x) / float32(scale)))   round to nearest even, saturated to +-FP8_MAX
    read back  x' = float(q) * scale

e4m3 is ``float8_e4m3fn`` (no inf; finite max 448; 3 mantissa bits), e5m2 is ``float8_e5m2`` (finite max 57344;
2 mantissa bits). CUDA's ``cvt.rn.satfinite.{e4m3x2,e5m2x2}.f32`` (kernels_cu/cache_ops.cu) computes the same
bytes; saturation is applied before the rounding here and after it there, which gives the same result (a value
that rounds past the max is past the max's half-way point, which the clip maps to the max as well).

Format codes the kernels take as a template parameter: 1 = e4m3, 2 = e5m2 (0 = the cache is in q's dtype).
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")  # vLLM's names; "fp8" means "fp8_e4m3"
FP8_DTYPES = ("fp8_e4m3", "fp8_e5m2")  # the canonical names every layer below the config uses
FP8_NUMPY = {"fp8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn), "fp8_e5m2": np.dtype(ml_dtypes.float8_e5m2)}
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
FP8_CODES = {"fp8_e4m3": 1, "fp8_e5m2": 2}
MANTISSA_BITS = {"fp8_e4m3": 3, "fp8_e5m2": 2}
MIN_NORMAL = {"fp8_e4m3": 2.0**-6, "fp8_e5m2": 2.0**-14}
MIN_COMPUTE_CAPABILITY = (8, 9)  # cvt to / from e4m3x2 and e5m2x2: sm_89 (Ada) and later


def resolve_kv_cache_dtype(kv_cache_dtype) -> str | None:
    """``"auto"`` -> None (the model's dtype); ``"fp8"`` / ``"fp8_e4m3"`` -> ``"fp8_e4m3"``; ``"fp8_e5m2"``.

    Raises:
        ValueError: anything else, naming the value and the choices.
    """
    if not isinstance(kv_cache_dtype, str) or kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    if kv_cache_dtype == "auto":
        return None
    return "fp8_e4m3" if kv_cache_dtype == "fp8" else kv_cache_dtype


def check_kv_dtype(kv_dtype) -> str:
    """A canonical fp8 name (``"fp8"`` accepted as ``"fp8_e4m3"``), else ``ValueError``."""
    if isinstance(kv_dtype, str) and kv_dtype == "fp8":
        return "fp8_e4m3"
    if not isinstance(kv_dtype, str) or kv_dtype not in FP8_DTYPES:
        raise ValueError(f"kv_dtype must be one of {FP8_DTYPES} (or 'fp8'), got {kv_dtype!r}")
    return kv_dtype


def check_scale(name: str, value) -> float:
    """A KV scale as a Python float: finite and > 0 (bools and non-numbers refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    f = float(value)
    if not (math.isfinite(f) and 0 < f <= float(np.finfo(np.float32).max)) or np.float32(f) == 0:
        raise ValueError(f"{name} must be a finite number > 0 (as float32), got {value!r}")
    return float(np.float32(f))


def check_scales(name: str, values, num_layers: int) -> np.ndarray:
    """Per-layer scales: a number (every layer) or a sequence of ``num_layers`` numbers -> float32 [num_layers]."""
    if np.ndim(values) == 0:
        return np.full(num_layers, check_scale(name, values), dtype=np.float32)
    values = list(np.asarray(values).reshape(-1)) if hasattr(values, "shape") else list(values)
    if len(values) != num_layers:
        raise ValueError(f"{name} must hold {num_layers} per-layer scales, got {len(values)}")
    return np.array([check_scale(f"{name}[{i}]", v) for i, v in enumerate(values)], dtype=np.float32)


def quantize(x, kv_dtype: str, scale: float = 1.0) -> np.ndarray:
    """Host twin of the cache-write kernel: ``fp8(sat(float32(x) / float32(scale)))`` as uint8 bytes, x's shape."""
    kv_dtype = check_kv_dtype(kv_dtype)
    scale = np.float32(check_scale("scale", scale))
    with np.errstate(over="ignore", invalid="ignore"):  # inf / NaN quotients: saturated or kept below
        y = np.asarray(x).astype(np.float32) / scale
    limit = np.float32(FP8_MAX[kv_dtype])
    y = np.clip(y, -limit, limit)  # NOTE: NaN stays NaN (the kernel's satfinite keeps it too)
    return y.astype(FP8_NUMPY[kv_dtype]).view(np.uint8)


def dequantize(q, kv_dtype: str, scale: float = 1.0) -> np.ndarray:
    """The float64 values the bytes ``q`` (uint8) stand for: ``float(q) * scale``."""
    kv_dtype = check_kv_dtype(kv_dtype)
    q = np.ascontiguousarray(np.asarray(q))
    if q.dtype != np.uint8:
        raise ValueError(f"fp8 bytes must be uint8, got {q.dtype}")
    return q.view(FP8_NUMPY[kv_dtype]).astype(np.float64) * float(np.float32(scale))


def error_bound(x, kv_dtype: str, scale: float = 1.0) -> np.ndarray:
    """The largest ``|dequantize(quantize(x)) - x|`` round-to-nearest allows, elementwise (float64):

    - ``|x| / scale`` at or above the max: the saturation error ``|x| - max * scale``;
    - a normal value: half an ulp, ``2^(e - m - 1) * scale`` with ``e = floor(log2 |x / scale|)`` (relative
      error <= 2^-(m+1): 1/16 for e4m3, 1/8 for e5m2);
    - a subnormal one: half the subnormal spacing, ``2^(e_min - m - 1) * scale``.
    Plus the float32 rounding of ``x / scale`` (one float32 half-ulp of the quotient, times the scale).
    """
    kv_dtype = check_kv_dtype(kv_dtype)
    scale = float(np.float32(scale))
    y = np.abs(np.asarray(x, dtype=np.float64)) / scale
    m, top = MANTISSA_BITS[kv_dtype], FP8_MAX[kv_dtype]
    e = np.floor(np.log2(np.maximum(y, MIN_NORMAL[kv_dtype])))
    rounding = np.exp2(e - m - 1) * scale + y * 2.0**-24 * scale
    return np.where(y >= top, (y - top) * scale + rounding, rounding)


def check_device_supports_fp8(compute_capability: str | tuple) -> None:
    """``ValueError`` when a GPU of this compute capability (``"90"`` or ``(9, 0)``) lacks fp8 conversions."""
    cc = compute_capability
    major, minor = (int(cc[:-1]), int(cc[-1])) if isinstance(cc, str) else (int(cc[0]), int(cc[1]))
    if (major, minor) < MIN_COMPUTE_CAPABILITY:  # NOTE: "100" (Blackwell) parses as (10, 0)
        need = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
        raise ValueError(f"kv_cache_dtype fp8 needs a GPU with compute capability >= {need} (fp8 conversions), "
                         f"this GPU has {major}.{minor}")


def calibrated_scale(amax: float, kv_dtype: str) -> float:
    """``amax / FP8_MAX`` (vLLM's ``calculate_kv_scales``), 1.0 when ``amax`` is 0 or not finite."""
    kv_dtype = check_kv_dtype(kv_dtype)
    amax = float(amax)
    if not math.isfinite(amax) or amax <= 0:
        return 1.0
    return float(np.float32(amax / FP8_MAX[kv_dtype])) or 1.0
