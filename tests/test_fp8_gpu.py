"""fp8 KV cache on the GPU (marked ``gpu``): the quantizing write_kv against the host's bytes (exact), byte
copies, prefill version 2 over fp8 caches against the float64 reference on the stored bytes (poisoned outputs,
NaN bytes in every unused slot), the engine end to end with CUDA graphs; and the fp8 kernels' compile check
(nvcc, CPU).

The grid: every head size x model dtype x fp8 format (PAGEDKV_SANITIZER_GRID=1 shrinks it;
PAGEDKV_FP8_QUICK=1 keeps every write case and six prefill instantiations: one device call's budget).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from test_kernels import _bf16_native, _exact_allocations, to_dev  # noqa: F401 (an autouse fixture)
from test_kernels_compile import ptxas_report
from test_prefill_attention import (BF16, F16, F32, SANITIZER, _seed, assert_close, make_batch, poisoned,
                                    to_host)

from pagedkv import fp8
from pagedkv.kernels import compile, ops, reference
from pagedkv.kernels import prefill as kernels_prefill

FORMATS = fp8.FP8_DTYPES
QUICK = os.environ.get("PAGEDKV_FP8_QUICK") == "1"
NVCC = shutil.which("nvcc")


def fp8_name_list(dt: int, head_dim: int) -> list[str]:
    return [kernels_prefill.DEFAULT_CONFIGS[head_dim].kernel_name(dt, head_dim, fmt) for fmt in (1, 2)]


# ---- CPU: the fp8 kernels compile for sm_90 without spills, and cache_ops.cu still builds for sm_80 -----------

@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
def test_fp8_prefill_kernels_compile_without_spills(tmp_path):
    names = [n for dt in (1, 2) for hd in kernels_prefill.HEAD_DIMS for n in fp8_name_list(dt, hd)]
    refs = ",\n  ".join(f"(const void*)&{n}" for n in names)
    src = tmp_path / "prefill_fp8.cu"
    src.write_text(compile.cu_source("prefill_attention.cu") + f"\nconst void* instantiate[] = {{\n  {refs}\n}};\n")
    proc = subprocess.run([NVCC, "-arch=sm_90", "--cubin", "-std=c++17", "-Xptxas", "-v", "-o",
                           str(src.with_suffix(".cubin")), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = ptxas_report(proc.stderr)
    assert sum("prefill_attention_v2_fp8" in n for n in report) == len(names)
    spilled = {n: r for n, r in report.items() if r[1] or r[2]}
    assert not spilled, f"spills (registers, store bytes, load bytes): {spilled}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("arch", ("sm_80", "sm_89", "sm_90"))
def test_cache_ops_compile_on_every_arch(tmp_path, arch):
    src = tmp_path / "cache_ops.cu"
    src.write_text(compile.cu_source("cache_ops.cu"))
    proc = subprocess.run([NVCC, f"-arch={arch}", "--cubin", "-std=c++17", "-Xptxas", "-v", "-o",
                           str(src.with_suffix(".cubin")), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {f"write_kv_fp8_{t}_{f}" for t in ("f32", "f16", "bf16") for f in ("e4m3", "e5m2")} <= \
        set(ptxas_report(proc.stderr))


# ---- GPU: write_kv and copy_blocks, exact ------------------------------------------------------------------

def _values(rng, kv_dtype, scale, n):
    """Normal values over many binades, exact midpoints of the format (ties), saturating and tiny ones."""
    codes = np.arange(256, dtype=np.uint8).view(fp8.FP8_NUMPY[kv_dtype]).astype(np.float64)
    vals = np.unique(codes[np.isfinite(codes)])
    mids = (vals[:-1] + vals[1:]) / 2 * scale
    top = fp8.FP8_MAX[kv_dtype] * scale
    special = np.concatenate([mids, [top * 1.02, -top * 1.5, 1e30, -1e30, np.inf, -np.inf, 0.0, -0.0]])
    x = rng.standard_normal(n) * np.exp2(rng.integers(-12, 12, n)) * scale
    x[: min(n, special.size)] = rng.permutation(special)[:n]
    return x


def _write_grid():
    dts = (F16, BF16, F32)
    if SANITIZER:
        return [(F16, 128, "fp8_e4m3"), (BF16, 64, "fp8_e5m2")]
    return [(dt, hd, f) for dt in dts for hd in kernels_prefill.HEAD_DIMS for f in FORMATS]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,head_dim,kv_dtype", _write_grid(), ids=str)
def test_write_kv_fp8_bytes_equal_the_host_quantization(dtype, head_dim, kv_dtype):
    import cupy

    if dtype == BF16 and not _bf16_native():
        pytest.skip("this CuPy has no bfloat16 dtype")
    rng = np.random.default_rng(_seed(str(dtype), head_dim, kv_dtype))
    num_tokens, heads, num_blocks, bs = 37, 2, 8, 8
    ks, vs = 0.5, 2.0  # powers of two: the test's midpoints stay exact midpoints after the division
    k = _values(rng, kv_dtype, ks, num_tokens * heads * head_dim).reshape(num_tokens, heads, head_dim)
    v = _values(rng, kv_dtype, vs, num_tokens * heads * head_dim).reshape(num_tokens, heads, head_dim)
    k, v = k.astype(dtype), v.astype(dtype)  # NOTE: ties stay ties in float16 / bfloat16 (few mantissa bits)
    slots = rng.permutation(num_blocks * bs)[:num_tokens].astype(np.int64)
    slots[[3, 20]] = -1
    kc = np.full((num_blocks, heads, bs, head_dim), 0x55, np.uint8)
    vc = kc.copy()
    dkc, dvc = cupy.asarray(kc), cupy.asarray(vc)
    ops.write_kv(to_dev(k), to_dev(v), dkc, dvc, cupy.asarray(slots), kv_dtype=kv_dtype, k_scale=ks, v_scale=vs)
    ops.write_kv(k, v, kc, vc, slots, kv_dtype=kv_dtype, k_scale=ks, v_scale=vs)  # the host twin
    np.testing.assert_array_equal(cupy.asnumpy(dkc), kc)
    np.testing.assert_array_equal(cupy.asnumpy(dvc), vc)
    back = fp8.dequantize(kc, kv_dtype, ks)
    assert np.isfinite(back).all()  # saturation: no inf / NaN from any input here (inf saturates too)


@pytest.mark.gpu
def test_copy_blocks_moves_fp8_bytes():
    import cupy

    rng = np.random.default_rng(11)
    kp = rng.integers(0, 256, (3, 10, 2, 16, 80), dtype=np.uint8)
    vp = rng.integers(0, 256, kp.shape, dtype=np.uint8)
    src, dst = np.array([1, 4, 7]), np.array([9, 0, 2])
    dk, dv = cupy.asarray(kp), cupy.asarray(vp)
    ops.copy_blocks(dk, dv, cupy.asarray(src), cupy.asarray(dst))
    ops.copy_blocks(kp, vp, src, dst)
    np.testing.assert_array_equal(cupy.asnumpy(dk), kp)
    np.testing.assert_array_equal(cupy.asnumpy(dv), vp)


# ---- GPU: prefill version 2 over fp8 caches --------------------------------------------------------------

def fp8_batch(batch, kv_dtype, k_scale, v_scale):
    """A make_batch batch with its caches quantized (NaN slots stay NaN bytes: poison)."""
    q, k, v, bt, qsl, cl = batch
    return q, fp8.quantize(k, kv_dtype, k_scale), fp8.quantize(v, kv_dtype, v_scale), bt, qsl, cl


def _fp8_versions(dtype, head_dim) -> tuple:
    """None (the op's default, :func:`pagedkv.kernels.prefill.fp8_default_version`), then every version that reads
    an fp8 cache on this GPU (2; 4 and 5 over the gathered copy on sm_90 for head_dim 64 / 128)."""
    import cupy

    dt = 1 if dtype == F16 else 2
    hopper = kernels_prefill.sm90.supports(dt, head_dim, cupy.cuda.Device().id)
    return (None, 2) + (kernels_prefill.sm90.VERSIONS if hopper else ())


def check_fp8(batch, dtype, kv_dtype, k_scale, v_scale, what="", versions=(None,)):
    q, kc, vc, bt, qsl, cl = batch
    ref = reference.prefill_attention(q, kc, vc, bt, qsl, cl, kv_dtype=kv_dtype, k_scale=k_scale, v_scale=v_scale)
    rows = ops.owned_rows(qsl, len(q))
    for version in versions:
        out = poisoned(q.shape, dtype)
        if version is None:
            ops.prefill_attention(*(to_dev(a) for a in batch), out=out, kv_dtype=kv_dtype, k_scale=k_scale,
                                  v_scale=v_scale)
        else:
            kernels_prefill.prefill_attention(*(to_dev(a) for a in batch), out=out, kv_dtype=kv_dtype,
                                              k_scale=k_scale, v_scale=v_scale, version=version)
        got = to_host(out, dtype)
        bits = got.view(np.uint16)
        assert (bits[~rows] == 0x7E00).all(), f"{what} v{version or 'default'}: an unowned row was written"
        assert_close(got.astype(np.float64), ref, rows, dtype, f"{what} v{version or 'default'}")


def _prefill_grid():
    if SANITIZER:
        return [(F16, 128, "fp8_e4m3"), (BF16, 64, "fp8_e5m2")]
    if QUICK:
        return [(F16, 64, "fp8_e4m3"), (F16, 128, "fp8_e4m3"), (BF16, 128, "fp8_e4m3"), (F16, 128, "fp8_e5m2"),
                (BF16, 256, "fp8_e5m2"), (F16, 96, "fp8_e4m3")]
    return [(dt, hd, f) for dt in (F16, BF16) for hd in kernels_prefill.HEAD_DIMS for f in FORMATS]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,head_dim,kv_dtype", _prefill_grid(), ids=str)
def test_prefill_fp8_every_head_dim(dtype, head_dim, kv_dtype):
    if dtype == BF16 and not _bf16_native():
        pytest.skip("this CuPy has no bfloat16 dtype")
    rng = np.random.default_rng(_seed("fp8", str(dtype), head_dim, kv_dtype))
    long = 200 if SANITIZER else 1500
    batch = make_batch(rng, np.float32, head_dim, 16, (8, 2), [1, 15, 16, 17, 37, long], [0, 0, 5, 40, 16, 0],
                       share=1, pad_rows=3)
    q = batch[0].astype(dtype)
    ks, vs = 0.011, 0.0037  # NOTE: not powers of two: the folded scales are checked for real
    check_fp8(fp8_batch((q, *batch[1:]), kv_dtype, ks, vs), dtype, kv_dtype, ks, vs, f"{dtype} hd={head_dim}",
              versions=_fp8_versions(dtype, head_dim))


@pytest.mark.gpu
@pytest.mark.parametrize("block_size,heads", [(1, (8, 8)), (8, (28, 4)), (32, (16, 1))], ids=str)
def test_prefill_fp8_block_sizes_and_gqa(block_size, heads):
    rng = np.random.default_rng(_seed("fp8", block_size, heads))
    new = [1, block_size + 1, 45, 300]
    batch = make_batch(rng, np.float32, 128, block_size, heads, new, [0, 3, 2 * block_size + 1, 7], share=2)
    q = batch[0].astype(F16)
    check_fp8(fp8_batch((q, *batch[1:]), "fp8_e4m3", 1.0, 1.0), F16, "fp8_e4m3", 1.0, 1.0, f"bs={block_size}",
              versions=_fp8_versions(F16, 128))


def _sm90_fp8_grid():
    heads = ((28, 4), (16, 1)) if SANITIZER else ((8, 8), (32, 8), (28, 4), (16, 1))
    return [(dt, hd, f, h) for dt, hd, f in ((F16, 128, "fp8_e4m3"), (BF16, 64, "fp8_e4m3"), (F16, 64, "fp8_e5m2"),
                                             (BF16, 128, "fp8_e5m2")) for h in heads]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,head_dim,kv_dtype,heads", _sm90_fp8_grid(), ids=str)
def test_prefill_fp8_hopper_gather_varlen_cached_prefixes(dtype, head_dim, kv_dtype, heads):
    """Versions 4 and 5 over the gathered 16-bit copy: varlen, cached prefixes ending mid-block, shared blocks, a
    padding sequence (garbage table row, never gathered), GQA 1/4/7/MQA, scales that are not powers of two, large
    values that saturate."""
    import cupy

    dt = 1 if dtype == F16 else 2
    if not kernels_prefill.sm90.supports(dt, head_dim, cupy.cuda.Device().id):
        pytest.skip("versions 4 and 5 need a compute capability 9.0 GPU")
    if dtype == BF16 and not _bf16_native():
        pytest.skip("this CuPy has no bfloat16 dtype")
    rng = np.random.default_rng(_seed("fp8 sm90", str(dtype), head_dim, kv_dtype, heads))
    new, cached = [1, 15, 130, 0, 257, 100 if SANITIZER else 400], [0, 37, 5, 0, 300, 200 if SANITIZER else 600]
    batch = make_batch(rng, np.float32, head_dim, 16, heads, new, cached, share=2, lead_rows=1, pad_rows=3)
    q, k, v = batch[0].astype(dtype), batch[1] * 3.0, batch[2] * 3.0
    ks, vs = 0.0071, 0.0043  # NOTE: |x| / scale runs past e4m3's 448 for the largest values: saturated bytes
    bt = batch[3].copy()
    bt[3] = -5  # the padding sequence's table row is garbage: the gather must not follow it
    check_fp8(fp8_batch((q, k, v, bt, *batch[4:]), kv_dtype, ks, vs), dtype, kv_dtype, ks, vs,
              f"sm90 fp8 {dtype} hd={head_dim} heads={heads}", versions=(None, *kernels_prefill.sm90.VERSIONS))


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", (1, 64))
def test_prefill_fp8_hopper_gather_block_sizes(block_size):
    import cupy

    if not kernels_prefill.sm90.supports(1, 128, cupy.cuda.Device().id):
        pytest.skip("versions 4 and 5 need a compute capability 9.0 GPU")
    rng = np.random.default_rng(_seed("fp8 sm90 bs", block_size))
    batch = make_batch(rng, np.float32, 128, block_size, (32, 8), [3, 129, 50 if SANITIZER else 300],
                       [block_size + 1, 0, 2 * block_size + 7], share=1, pad_rows=2)
    q = batch[0].astype(F16)
    check_fp8(fp8_batch((q, *batch[1:]), "fp8_e4m3", 0.02, 0.5), F16, "fp8_e4m3", 0.02, 0.5, f"bs={block_size}",
              versions=(None, *kernels_prefill.sm90.VERSIONS))


def test_fp8_default_version_falls_back_past_the_gather_limit(monkeypatch):
    """CPU: the Hopper default over the gathered copy while it fits FP8_GATHER_LIMIT, version 2 past it."""
    monkeypatch.setattr(kernels_prefill.sm90, "supports", lambda dt, hd, dev: True)
    monkeypatch.setattr(kernels_prefill, "FP8_HOPPER_DEFAULT", True)
    small = kernels_prefill.fp8_default_version(1, 128, (4, 64), (1000, 8, 16, 128), 0)
    assert small == kernels_prefill.sm90.DEFAULT_VERSION[128]
    monkeypatch.setattr(kernels_prefill, "FP8_GATHER_LIMIT", 4 * 64 * 8 * 16 * 128 * 4 - 1)
    assert kernels_prefill.fp8_default_version(1, 128, (4, 64), (1000, 8, 16, 128), 0) == 2
    monkeypatch.setattr(kernels_prefill.sm90, "supports", lambda dt, hd, dev: False)
    assert kernels_prefill.fp8_default_version(1, 128, (1, 1), (10, 8, 16, 128), 0) == 2
    monkeypatch.setattr(kernels_prefill.sm90, "supports", lambda dt, hd, dev: True)
    monkeypatch.setattr(kernels_prefill, "FP8_HOPPER_DEFAULT", False)
    assert kernels_prefill.fp8_default_version(1, 128, (1, 1), (10, 8, 16, 128), 0) == 2


@pytest.mark.gpu
def test_prefill_fp8_refusals():
    import cupy

    rng = np.random.default_rng(12)
    q, kc, vc, bt, qsl, cl = (to_dev(a) for a in fp8_batch(make_batch(rng, np.float32, 64, 16, (4, 2), [5], [0]),
                                                            "fp8_e4m3", 1.0, 1.0))
    with pytest.raises(ValueError, match="runs version 2, 4 or 5"):  # float32 q
        kernels_prefill.prefill_attention(q, kc, vc, bt, qsl, cl, kv_dtype="fp8_e4m3")
    with pytest.raises(ValueError, match="runs version 2, 4 or 5"):
        kernels_prefill.prefill_attention(q.astype(cupy.float16), kc, vc, bt, qsl, cl, kv_dtype="fp8", version=1)
    with pytest.raises(ValueError, match="v_scale"):
        ops.prefill_attention(q.astype(cupy.float16), kc, vc, bt, qsl, cl, kv_dtype="fp8", v_scale=0.0)


# ---- GPU: the engine end to end ---------------------------------------------------------------------------

def _agreement(a, b) -> float:
    return float(np.mean([x == y for s, t in zip(a, b) for x, y in zip(s, t)]))


@pytest.mark.gpu
def test_engine_fp8_with_graphs_tracks_eager_and_float16():
    """fp8 with calibrated scales, eager and with CUDA graphs (the same calibration: the same scales); float16
    arithmetic differs between the graphs' decode-style prefill and the eager prefill kernel, so tokens are
    compared as agreement, not bit for bit (the accuracy experiment reports the real figures)."""
    from engine_gpu_support import _gpu_engine, _shared_prompts

    from pagedkv.engine import SamplingParams

    prompts = _shared_prompts(12)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    common = dict(max_num_batched_tokens=48)
    runs, engines = {}, {}
    for name, kw in {"fp16": {}, "fp8-eager": dict(kv_cache_dtype="fp8", calculate_kv_scales=True),
                     "fp8-graphs": dict(kv_cache_dtype="fp8", calculate_kv_scales=True, cuda_graph=True)}.items():
        eng = engines[name] = _gpu_engine("float16", **common, **kw)
        runs[name] = [o.outputs[0].token_ids for o in eng.generate(prompts, params, progress=False)]
        assert all(len(t) == 24 for t in runs[name])
    eager, graphs = engines["fp8-eager"].kv_cache, engines["fp8-graphs"].kv_cache
    assert eager.k_pool.dtype == np.uint8 and (eager.k_scales != 1.0).all()
    np.testing.assert_array_equal(eager.k_scales, graphs.k_scales)
    np.testing.assert_array_equal(eager.v_scales, graphs.v_scales)
    assert engines["fp8-graphs"].graph_error is None
    assert _agreement(runs["fp8-graphs"], runs["fp8-eager"]) >= 0.8
    assert _agreement(runs["fp16"], runs["fp8-eager"]) >= 0.5


@pytest.mark.gpu
def test_engine_fp8_preempts_and_finishes_every_request():
    """A pool small enough to preempt: every request finishes with all its tokens, the pool is empty at the end,
    and the tokens track the unpreempted run (recomputed K/V may round differently in float16)."""
    from engine_gpu_support import _gpu_engine, _shared_prompts

    from pagedkv.engine import SamplingParams

    prompts, params = _shared_prompts(10, seed=3), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    big = _gpu_engine("float16", kv_cache_dtype="fp8", enable_prefix_caching=False, cuda_graph=True)
    small = _gpu_engine("float16", kv_cache_dtype="fp8", enable_prefix_caching=False, cuda_graph=True,
                        num_blocks=30, watermark=0.0)
    want = [o.outputs[0].token_ids for o in big.generate(prompts, params, progress=False)]
    got = [o.outputs[0].token_ids for o in small.generate(prompts, params, progress=False)]
    assert small.metrics().num_preemptions > 0 and all(len(t) == 20 for t in got)
    assert small.metrics().num_used_blocks == 0
    assert _agreement(got, want) >= 0.8
