"""fp8 KV formats on the host (pagedkv.fp8): quantize -> dequantize bounds (Hypothesis), round-to-nearest-even
on exact midpoints, saturation, no inf / NaN from finite input, and the refusals of bad names and scales."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pagedkv import fp8

FORMATS = fp8.FP8_DTYPES
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
scales = st.floats(min_value=2.0**-20, max_value=2.0**20, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None)
@given(kv_dtype=st.sampled_from(FORMATS), scale=scales,
       x=hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=16), elements=finite32))
def test_round_trip_within_half_ulp(kv_dtype, scale, x):
    q = fp8.quantize(x, kv_dtype, scale)
    assert q.dtype == np.uint8 and q.shape == x.shape
    back = fp8.dequantize(q, kv_dtype, scale)
    assert np.isfinite(back).all()  # finite input never stores inf / NaN (saturation)
    err = np.abs(back - x.astype(np.float64))
    assert (err <= fp8.error_bound(x, kv_dtype, scale) * (1 + 1e-12)).all()
    top = fp8.FP8_MAX[kv_dtype] * float(np.float32(scale))
    assert (np.abs(back) <= top * (1 + 1e-12)).all()


@settings(max_examples=200, deadline=None)
@given(kv_dtype=st.sampled_from(FORMATS),
       x=st.floats(min_value=2.0**-6, max_value=400.0, allow_nan=False, width=32),
       sign=st.sampled_from([-1.0, 1.0]))
def test_relative_error_of_normals_is_at_most_half_ulp(kv_dtype, x, sign):
    x = np.float32(sign * x)
    back = fp8.dequantize(fp8.quantize(np.array([x]), kv_dtype), kv_dtype)[0]
    assert abs(back - x) <= 2.0 ** -(fp8.MANTISSA_BITS[kv_dtype] + 1) * abs(float(x))


def _finite_values(kv_dtype):
    """Every finite non-negative value of the format, ascending, with its byte."""
    codes = np.arange(256, dtype=np.uint8)
    vals = codes.view(fp8.FP8_NUMPY[kv_dtype]).astype(np.float64)
    keep = np.isfinite(vals) & (vals >= 0) & ~((vals == 0) & (codes != 0))
    order = np.argsort(vals[keep])
    return vals[keep][order], codes[keep][order]


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_midpoints_round_to_even_and_neighbours_exact(kv_dtype):
    vals, codes = _finite_values(kv_dtype)
    assert vals[-1] == fp8.FP8_MAX[kv_dtype]
    np.testing.assert_array_equal(fp8.quantize(vals.astype(np.float32), kv_dtype), codes)  # exact values
    mids = (vals[:-1] + vals[1:]) / 2
    assert (mids.astype(np.float32) == mids).all()  # representable: the test is exact
    got = fp8.quantize(mids.astype(np.float32), kv_dtype)
    even = np.where(codes[:-1] % 2 == 0, codes[:-1], codes[1:])  # the neighbour with an even mantissa
    np.testing.assert_array_equal(got, even)
    np.testing.assert_array_equal(fp8.quantize(-mids.astype(np.float32), kv_dtype), even | 0x80)


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_saturation(kv_dtype):
    top = fp8.FP8_MAX[kv_dtype]
    x = np.array([top, top * 1.03, top * 1.1, 1e30, np.finfo(np.float32).max, np.inf, -1e30, -np.inf],
                 dtype=np.float32)
    back = fp8.dequantize(fp8.quantize(x, kv_dtype), kv_dtype)
    np.testing.assert_array_equal(back, [top] * 6 + [-top] * 2)
    # a scale maps the same saturation point to top * scale
    np.testing.assert_array_equal(fp8.dequantize(fp8.quantize(np.float32([1e6]), kv_dtype, 0.5), kv_dtype, 0.5),
                                  [top * 0.5])


def test_matches_ml_dtypes_inside_the_range():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4096).astype(np.float32) * 10
    for kv_dtype in FORMATS:
        want = (x / np.float32(0.25)).astype(fp8.FP8_NUMPY[kv_dtype]).view(np.uint8)
        np.testing.assert_array_equal(fp8.quantize(x, kv_dtype, 0.25), want)
    assert fp8.FP8_NUMPY["fp8_e4m3"] == np.dtype(ml_dtypes.float8_e4m3fn)


@pytest.mark.parametrize("name, want", [("auto", None), ("fp8", "fp8_e4m3"), ("fp8_e4m3", "fp8_e4m3"),
                                        ("fp8_e5m2", "fp8_e5m2")])
def test_resolve_names(name, want):
    assert fp8.resolve_kv_cache_dtype(name) == want


@pytest.mark.parametrize("name", ["fp16", "FP8", "int8", "", None, 8, "fp8_e4m3fn"])
def test_unknown_names_refused(name):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        fp8.resolve_kv_cache_dtype(name)
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        fp8.check_kv_dtype(name)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, -math.inf, math.nan, 1e39, True, "1", None])
def test_bad_scales_refused(scale):
    with pytest.raises(ValueError, match="finite number > 0"):
        fp8.check_scale("k_scale", scale)
    with pytest.raises(ValueError, match="finite number > 0"):
        fp8.quantize(np.ones(2, np.float32), "fp8", scale)


def test_per_layer_scales():
    np.testing.assert_array_equal(fp8.check_scales("k_scale", 0.5, 3), np.float32([0.5] * 3))
    np.testing.assert_array_equal(fp8.check_scales("k_scale", [1, 2], 2), np.float32([1, 2]))
    with pytest.raises(ValueError, match="3 per-layer"):
        fp8.check_scales("k_scale", [1, 2], 3)
    with pytest.raises(ValueError, match=r"v_scale\[1\]"):
        fp8.check_scales("v_scale", [1, 0], 2)


@pytest.mark.parametrize("cc, ok", [("90", True), ("89", True), ((8, 9), True), ("86", False), ("80", False),
                                    ((7, 5), False), ("100", True)])
def test_device_capability(cc, ok):
    if ok:
        fp8.check_device_supports_fp8(cc)
    else:
        with pytest.raises(ValueError, match="compute capability >= 8.9"):
            fp8.check_device_supports_fp8(cc)


def test_calibrated_scale():
    assert fp8.calibrated_scale(448.0 * 3, "fp8") == pytest.approx(3.0)
    assert fp8.calibrated_scale(57344.0, "fp8_e5m2") == 1.0
    assert fp8.calibrated_scale(0.0, "fp8") == 1.0
    assert fp8.calibrated_scale(math.nan, "fp8") == 1.0


def _byte_perm(x: np.ndarray, sel: int) -> np.ndarray:
    """CUDA's __byte_perm(x, 0, sel) on uint32 arrays: result byte i = byte (sel >> 4i) & 7 of (x, 0)."""
    out = np.zeros_like(x)
    for i in range(4):
        s = (sel >> (4 * i)) & 7
        byte = (x >> np.uint32(8 * s)) & np.uint32(0xFF) if s < 4 else np.zeros_like(x)
        out |= byte << np.uint32(8 * i)
    return out


def _prmt(x: np.ndarray, y: np.ndarray, sel: int) -> np.ndarray:
    """PTX prmt.b32 d, x, y, sel (default mode) on uint32 arrays: result byte i = byte (sel >> 4i) & 7 of the
    eight bytes (x: 0-3, y: 4-7); the sign-replicate bit (8) is not used here."""
    both = x.astype(np.uint64) | (y.astype(np.uint64) << np.uint64(32))
    out = np.zeros_like(x)
    for i in range(4):
        s = (sel >> (4 * i)) & 7
        out |= ((both >> np.uint64(8 * s)) & np.uint64(0xFF)).astype(np.uint32) << np.uint32(8 * i)
    return out


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_the_register_paths_byte_pair_conversion_is_exact(kv_dtype):
    """fp8_convert.cuh's fp8pair_to_16 (decode version 4's register path) emulated on every pair of bytes at
    every byte position k: byte k of x in the low half, byte k of y in the high half, e4m3 as the value times
    2^-8 (the junk low byte of each half dropped by the shift), e5m2 as the byte on top of a float16."""
    rng = np.random.default_rng(18)
    codes = np.arange(256, dtype=np.uint32)
    xs, ys = np.meshgrid(codes, codes, indexing="ij")
    xs, ys = xs.ravel(), ys.ravel()  # every (x byte, y byte) pair
    unit = 256.0 if kv_dtype == "fp8_e4m3" else 1.0
    for k in range(4):
        noise_x = rng.integers(0, 2**32, xs.size, dtype=np.uint64).astype(np.uint32)
        noise_y = rng.integers(0, 2**32, xs.size, dtype=np.uint64).astype(np.uint32)
        keep = np.uint32(~(0xFF << (8 * k)) & 0xFFFFFFFF)
        x = (noise_x & keep) | (xs << np.uint32(8 * k))  # the other bytes: other dimensions' values
        y = (noise_y & keep) | (ys << np.uint32(8 * k))
        r = _prmt(x, y, 0x4400 + 0x1111 * k)
        if kv_dtype == "fp8_e4m3":
            r = (r & np.uint32(0x80008000)) | ((r >> np.uint32(1)) & np.uint32(0x3F803F80))
        else:
            r &= np.uint32(0xFF00FF00)
        halves = np.stack([r & 0xFFFF, r >> 16], axis=1).astype(np.uint16).view(np.float16).astype(np.float64)
        want = fp8.dequantize(np.stack([xs, ys], axis=1).astype(np.uint8), kv_dtype)
        finite = np.isfinite(want)
        np.testing.assert_array_equal(halves[finite] * unit, want[finite])


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_the_kernels_fp8_to_float16_bit_trick_is_exact(kv_dtype):
    """prefill_attention.cu's fp8x4_to_16 (and decode's e4m3 path) emulated on every byte: e5m2 -> its byte as
    float16's top byte; e4m3 -> bits s.0eeee.mmm0000000, the value times 2^-8 (the launcher's unit 256)."""
    codes = np.arange(256, dtype=np.uint32)
    words = codes | (codes[::-1] << np.uint32(8)) | (codes << np.uint32(16)) | (codes[::-1] << np.uint32(24))
    lo, hi = _byte_perm(words, 0x1404), _byte_perm(words, 0x3424)
    if kv_dtype == "fp8_e4m3":
        lo = (lo & np.uint32(0x80008000)) | ((lo >> np.uint32(1)) & np.uint32(0x3F803F80))
        hi = (hi & np.uint32(0x80008000)) | ((hi >> np.uint32(1)) & np.uint32(0x3F803F80))
    unit = 256.0 if kv_dtype == "fp8_e4m3" else 1.0
    halves = np.stack([lo & 0xFFFF, lo >> 16, hi & 0xFFFF, hi >> 16], axis=1).astype(np.uint16).view(np.float16)
    got = halves.astype(np.float64) * unit  # [256, 4]: bytes 0..3 of each word
    bytes_ = np.stack([codes, codes[::-1], codes, codes[::-1]], axis=1).astype(np.uint8)
    want = fp8.dequantize(bytes_, kv_dtype)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[finite], want[finite])
    if kv_dtype == "fp8_e5m2":
        assert np.isnan(got[np.isnan(want)]).all()  # e5m2 NaN bytes stay NaN (e4m3's read as finite: never read)
