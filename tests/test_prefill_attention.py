"""Prefill attention: the float64 reference and the op's validation (CPU), kernels_cu/prefill_attention.cu
against the reference (GPU, marked ``gpu``), and the kernel's compile check (nvcc, CPU).

Every GPU launch writes into an output poisoned with NaN over caches holding NaN in every slot no sequence
uses (unused slots of used blocks, unreferenced blocks) and block tables whose unused entries are out of
range: a finite result within tolerance proves every owned row was written and nothing unused was read, and
rows no sequence owns must keep their poison bits.

PAGEDKV_SANITIZER_GRID=1 shrinks the grid for compute-sanitizer runs (and skips the long cases).
"""
import math
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedkv.kernels import compile, ops, prefill, reference
from test_kernels import _bf16_native, _exact_allocations, to_dev  # noqa: F401 (an autouse fixture)
from test_kernels_compile import ptxas_report

SANITIZER = os.environ.get("PAGEDKV_SANITIZER_GRID") == "1"
BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
DTYPES = (F32, F16, BF16)
# norm-wise relative error over all owned rows, and the worst single (row, head)
RTOL = {F32: 2e-5, F16: 3e-3, BF16: 2e-2}
ROW_RTOL = {F32: 2e-4, F16: 2e-2, BF16: 8e-2}
NAN_BITS = {2: 0x7E00, 4: 0x7FC00000}
GARBAGE_ID = 1 << 30  # unused block-table entries: out of range, so reading one would fault or poison


# ---- batches -----------------------------------------------------------------------------------------

def make_batch(rng, dtype, head_dim, block_size, heads, new_lens, cached_lens, share=0, lead_rows=0, pad_rows=0,
               extra_blocks=3):
    """A random prefill batch (host arrays). Sequences with new tokens share their first ``share`` blocks
    when their cached prefixes cover them (a forked / prefix-cached prompt); every unused cache slot is NaN.

    q rows: ``lead_rows`` unowned rows, the new tokens of each sequence, ``pad_rows`` unowned rows.
    Returns (q, k_cache, v_cache, block_tables, query_start_loc, context_lens).
    """
    num_qo_heads, num_kv_heads = heads
    new = np.asarray(new_lens, dtype=np.int64)
    lens = (np.asarray(cached_lens, dtype=np.int64) + new).astype(np.int32)
    used = -(-lens // block_size)
    sharing = [share if n > 0 and c // block_size >= share else 0 for c, n in zip(cached_lens, new)]
    num_blocks = share + int(used.sum()) - sum(sharing) + extra_blocks
    perm = rng.permutation(num_blocks).astype(np.int32)
    tables = np.full((len(lens), max(1, int(used.max(initial=0)) + 2)), GARBAGE_ID, dtype=np.int32)
    nxt = share
    for i, (u, s) in enumerate(zip(used, sharing)):
        tables[i, :s] = perm[:s]  # the same physical blocks in every sharing sequence
        tables[i, s:u] = perm[nxt:nxt + u - s]
        nxt += u - s
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k, v = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    live = np.zeros((num_blocks, block_size), dtype=bool)
    for i, length in enumerate(lens):
        t = np.arange(length)
        live[tables[i, t // block_size], t % block_size] = True
    k.transpose(0, 2, 1, 3)[~live] = np.nan
    v.transpose(0, 2, 1, 3)[~live] = np.nan
    starts = (lead_rows + np.concatenate([[0], np.cumsum(new)])).astype(np.int32)
    q = rng.standard_normal((int(starts[-1]) + pad_rows, num_qo_heads, head_dim)).astype(np.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), tables, starts, lens


def assert_close(got, ref, rows, dtype, what=""):
    """Owned rows: finite, norm-wise relative error <= RTOL, worst (row, head) <= ROW_RTOL; on failure the
    message says where the error sits (rows, heads, 8-wide head-dim chunks): a layout bug shows a pattern."""
    g, r = got[rows], ref[rows]
    if not rows.any():
        return  # a batch of padding only: nothing to compare (the caller checked the poison bits)
    bad_rows = np.flatnonzero(~np.isfinite(g).all(axis=(1, 2)))
    assert not bad_rows.size, f"{what}: unwritten or NaN-contaminated rows {bad_rows[:10]}"
    err = np.linalg.norm(g - r) / np.linalg.norm(r)
    per = np.linalg.norm(g - r, axis=2) / np.maximum(np.linalg.norm(r, axis=2), 1e-30)  # [rows, heads]
    if err <= RTOL[dtype] and per.max() <= ROW_RTOL[dtype]:
        return
    worst = np.argsort(per, axis=None)[::-1][:6]
    row_ids = np.flatnonzero(rows)
    places = [(int(row_ids[i // per.shape[1]]), int(i % per.shape[1]), round(float(per.flat[i]), 4)) for i in worst]
    d = g.shape[2]
    by_chunk = np.linalg.norm((g - r).reshape(len(g), -1, d // 8, 8), axis=(0, 1, 3)).round(3)
    raise AssertionError(f"{what}: rel err {err:.3g} (tol {RTOL[dtype]}), worst (row, head, err) {places}, "
                         f"error by head: {np.linalg.norm(g - r, axis=(0, 2)).round(3)}, by 8-dim chunk: {by_chunk}")


# ---- CPU: the reference --------------------------------------------------------------------------------

def test_reference_matches_dense_attention_per_sequence():
    rng = np.random.default_rng(0)
    q, k, v, bt, qsl, cl = make_batch(rng, np.dtype(np.float64), 16, 4, (6, 2), [3, 5, 0, 9], [4, 0, 2, 7],
                                      share=1, pad_rows=2)
    out = reference.prefill_attention(q, k, v, bt, qsl, cl, scale=0.3)
    for i in range(len(cl)):
        a, b = int(qsl[i]), int(qsl[i + 1])
        if b > a:
            kk, vv = reference.paged_gather(k, bt[i], cl[i]), reference.paged_gather(v, bt[i], cl[i])
            np.testing.assert_allclose(out[a:b], reference.dense_attention(q[a:b], kk, vv, scale=0.3, causal=True),
                                       rtol=1e-12, atol=1e-12)
    assert not out[int(qsl[-1]):].any()  # rows no sequence owns are 0


def test_reference_by_brute_force():
    """Token by token, head by head, key by key: the definition, with no shared code."""
    rng = np.random.default_rng(1)
    q, k, v, bt, qsl, cl = make_batch(rng, np.dtype(np.float64), 8, 2, (4, 2), [2, 3], [3, 0])
    out = reference.prefill_attention(q, k, v, bt, qsl, cl)
    for i in range(2):
        n = int(qsl[i + 1] - qsl[i])
        for j in range(n):
            pos = int(cl[i]) - n + j
            for h in range(4):
                keys = [k[bt[i, t // 2], h // 2, t % 2] for t in range(pos + 1)]
                vals = [v[bt[i, t // 2], h // 2, t % 2] for t in range(pos + 1)]
                w = [math.exp(float(q[qsl[i] + j, h] @ kk) / math.sqrt(8)) for kk in keys]
                want = sum(wi * vi for wi, vi in zip(w, vals)) / sum(w)
                np.testing.assert_allclose(out[qsl[i] + j, h], want, rtol=1e-12)


def test_reference_chunks_agree_with_one_chunk(monkeypatch):
    rng = np.random.default_rng(2)
    q, k, v, bt, qsl, cl = make_batch(rng, np.dtype(np.float64), 16, 8, (8, 2), [40, 17], [13, 0])
    whole = reference.prefill_attention(q, k, v, bt, qsl, cl)
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 1)  # one query row per chunk
    np.testing.assert_allclose(reference.prefill_attention(q, k, v, bt, qsl, cl), whole, rtol=1e-12, atol=1e-12)


# ---- CPU: the op's host path and its validation --------------------------------------------------------

def test_op_host_path_writes_owned_rows_only():
    rng = np.random.default_rng(3)
    q, k, v, bt, qsl, cl = make_batch(rng, F32, 16, 4, (4, 4), [0, 3, 5], [2, 4, 0], lead_rows=2, pad_rows=3)
    out = np.full(q.shape, np.nan, dtype=np.float32)
    ops.prefill_attention(q, k, v, bt, qsl, cl, out=out)
    rows = ops.owned_rows(qsl, len(q))
    ref = reference.prefill_attention(q, k, v, bt, qsl, cl)
    np.testing.assert_allclose(out[rows], ref[rows], rtol=1e-5)
    assert np.isnan(out[~rows]).all() and (~rows).sum() == 5
    assert not ops.prefill_attention(q, k, v, bt, qsl, cl)[~rows].any()  # a new output: zeros there


def _valid_args():
    rng = np.random.default_rng(4)
    return list(make_batch(rng, F32, 16, 4, (4, 2), [3, 2], [1, 5]))


BAD_INPUTS = [  # (what to change, error pattern)
    ("q dtype", lambda a: a.__setitem__(0, a[0].astype(np.float64)), "q dtype"),
    ("q head_dim", lambda a: a.__setitem__(0, a[0][..., :8]), "q must be"),
    ("q heads", lambda a: a.__setitem__(0, np.zeros((5, 3, 16), np.float32)), "not divisible"),
    ("cache pair", lambda a: a.__setitem__(2, a[2][:-1]), "differ"),
    ("table dtype", lambda a: a.__setitem__(3, a[3].astype(np.float32)), "block_tables must be"),
    ("qsl length", lambda a: a.__setitem__(4, a[4][:-1]), "batch mismatch"),
    ("table rows", lambda a: a.__setitem__(3, a[3][:1]), "batch mismatch"),
    ("qsl decreasing", lambda a: a[4].__setitem__(1, 6), r"query_start_loc\[2\]=5"),
    ("qsl negative", lambda a: a[4].__setitem__(0, -1), r"query_start_loc\[0\]=-1"),
    ("qsl past the rows", lambda a: a[4].__setitem__(2, 6), r"query_start_loc\[2\]=6.*num_tokens=5"),
    ("context shorter than the new tokens", lambda a: a[5].__setitem__(1, 1), r"context_lens\[1\]=1 outside \[2, "),
    ("context past the table", lambda a: a[5].__setitem__(0, 10**4), r"context_lens\[0\]=10000"),
    ("used entry out of range", lambda a: a[3].__setitem__((1, 1), 10**6), r"block_tables\[1, 1\]=1000000"),
    ("used entry negative", lambda a: a[3].__setitem__((0, 0), -1), r"block_tables\[0, 0\]=-1"),
]


@pytest.mark.parametrize("what,change,pattern", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_op_validation(what, change, pattern):
    args = _valid_args()
    out = np.full(args[0].shape, 7.0, dtype=np.float32)
    change(args)
    with pytest.raises(ValueError, match=pattern):
        ops.prefill_attention(*args, out=out if args[0].shape == out.shape and args[0].dtype == out.dtype else None)
    assert (out == 7.0).all()  # nothing written before the error


def test_op_validation_of_scale_and_out():
    args = _valid_args()
    for scale in (float("nan"), float("inf"), "0.1", 0.0, -0.125):
        with pytest.raises(ValueError, match="scale"):
            ops.prefill_attention(*args, scale=scale)
    with pytest.raises(ValueError, match="out must be"):
        ops.prefill_attention(*args, out=np.zeros((1, 4, 16), np.float32))
    unused = [a.copy() for a in args]
    unused[3][0, 2:] = -5  # entries past sequence 0's blocks (6 tokens = 2 blocks) are never checked or read
    ops.prefill_attention(*unused)
    padding = [a.copy() for a in args]  # a sequence without new tokens: its table and length are not used
    padding[4][1:] = padding[4][0]
    padding[3][:, :] = -3
    padding[5][:] = 0
    assert not ops.prefill_attention(*padding).any()


@settings(max_examples=50, deadline=None)
@given(lens=st.lists(st.integers(0, 300), min_size=0, max_size=12), extra=st.integers(0, 50),
       group=st.sampled_from([1, 3, 4, 7, 8, 32]), block_m=st.sampled_from([64, 128]))
def test_capacity_bounds_the_work_items(lens, extra, group, block_m):
    """Launch shape from shapes only: the grid covers every batch of num_tokens tokens in num_seqs sequences."""
    num_tokens = sum(lens) + extra
    tiles = sum(-(-n * group // block_m) for n in lens)
    assert prefill.capacity(num_tokens, len(lens), group, block_m) >= tiles


def test_causal_flops_counts_attended_pairs():
    assert prefill.causal_flops(3, 0, 1, 1) == 4 * 6  # 1 + 2 + 3 pairs
    assert prefill.causal_flops(2, 5, 32, 64) == 4 * 64 * 32 * (2 * 5 + 3)


def test_default_configs_cover_every_head_dim():
    assert set(prefill.DEFAULT_CONFIGS) == set(prefill.HEAD_DIMS)
    for hd, cfg in prefill.DEFAULT_CONFIGS.items():
        assert cfg.block_n <= cfg.threads and cfg.smem_bytes(hd) <= 227 * 1024



def test_default_version_dispatch(monkeypatch):
    """The Hopper kernels where they run (sm_90, float16 / bfloat16: version 5 at head_dim 64, 4 at 128); 2 for
    the other 16-bit cases, 1 for float32."""
    sm90 = prefill.sm90
    monkeypatch.setattr(sm90, "available", lambda device_id: True)
    assert [prefill.default_version(dt, hd, 0) for dt, hd in ((1, 64), (2, 128), (1, 80), (2, 256), (0, 64))] \
        == [5, 4, 2, 2, 1]
    monkeypatch.setattr(sm90, "available", lambda device_id: False)
    assert [prefill.default_version(dt, 128, 0) for dt in (0, 1, 2)] == [1, 2, 2]


def test_sm90_launch_resources_fit_an_h100():
    sm90 = prefill.sm90
    for hd in sm90.HEAD_DIMS:
        assert max(sm90.smem_bytes(v, hd) for v in sm90.VERSIONS) <= 227 * 1024
    # setmaxnreg: producer + consumers within the 64K registers of the SM, as the kernel's constants say
    src = compile.cu_source(sm90.FILENAME)
    regs = {k: int(re.search(rf"#define PAGEDKV_SM90_{k}_REGS (\d+)", src).group(1)) for k in ("PRODUCER", "CONSUMER")}
    assert 128 * regs["PRODUCER"] + 256 * regs["CONSUMER"] <= 65536 and regs["CONSUMER"] % 8 == 0


# ---- CPU: the benchmark's command line -----------------------------------------------------------------

def _bench(*args):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-m", "experiments.prefill_bench", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)


def test_prefill_bench_help_and_flag_errors():
    assert _bench("--help").returncode == 0
    for args, message in ((["--runs", "1"], "error: --runs must be in [3, 1000], got 1"),
                          (["--cases", "4k"], "error: argument --cases: invalid choice: '4k'"),
                          (["--ttft-runs", "0"], "error: --ttft-runs must be in [1, 50], got 0")):
        proc = _bench(*args)
        assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr


def test_prefill_bench_without_a_gpu_is_one_line_error():
    from pagedkv.backend import gpu_status

    if gpu_status()[0]:
        pytest.skip("a GPU is usable here: prefill_bench would run")
    proc = _bench("--ttft-lens")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: prefill_bench measures a GPU and none is usable")

# ---- CPU: the kernels compile for sm_80 and sm_90 without spills ----------------------------------------

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("arch", ("sm_80", "sm_90", "sm_90a"))
def test_prefill_kernels_compile_without_spills(tmp_path, arch):
    """Every instantiation the launcher may launch, compiled as the loader does (common.cuh inlined); version 3
    (wgmma) for sm_90a, as pagedkv.kernels.compile builds it."""
    if arch == "sm_90a":
        names, flags = list(prefill.v3_names()), ["-gencode=arch=compute_90a,code=sm_90a"]
    else:
        names = [n for dt in (0, 1, 2) for hd in prefill.HEAD_DIMS
                 for n in prefill.launched_names(dt, hd)]
        flags = [f"-arch={arch}"]
    refs = ",\n  ".join(f"(const void*)&{n}" for n in names)
    src = tmp_path / f"prefill.{arch}.cu"
    src.write_text(compile.cu_source("prefill_attention.cu") + f"\nconst void* instantiate[] = {{\n  {refs}\n}};\n")
    proc = subprocess.run([NVCC, *flags, "--cubin", "-std=c++17", "-Xptxas", "-v", "-o",
                           str(src.with_suffix(".cubin")), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = ptxas_report(proc.stderr)
    assert {"prefill_plan_kernel", "prefill_check_kernel"} <= set(report)
    assert sum("prefill_attention_v" in n for n in report) == len(names)
    assert "serialized" not in proc.stderr  # ptxas serializing wgmma would cost most of version 3's gain
    spilled = {n: r for n, r in report.items() if r[1] or r[2]}
    assert not spilled, f"spills (registers, store bytes, load bytes): {spilled}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
def test_sm90_kernel_compiles_without_spills(tmp_path):
    """Versions 4 and 5 for sm_90a: every instantiation, no spills, no wgmma serialized by ptxas."""
    names = prefill.sm90.names()
    refs = ",\n  ".join(f"(const void*)&{n}" for n in names)
    src = tmp_path / "prefill_sm90.cu"
    text = compile.cu_source(prefill.sm90.FILENAME)
    src.write_text(text + f"\nconst void* instantiate[] = {{\n  {refs}\n}};\n")
    proc = subprocess.run([NVCC, "-gencode=arch=compute_90a,code=sm_90a", "--cubin", "-std=c++17", "-Xptxas", "-v",
                           "-o", str(src.with_suffix(".cubin")), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = ptxas_report(proc.stderr)
    assert sum("prefill_attention_v4" in n or "prefill_attention_v5" in n for n in report) == len(names)
    assert "serialized" not in proc.stderr
    spilled = {n: r for n, r in report.items() if r[1] or r[2]}
    assert not spilled, f"spills (registers, store bytes, load bytes): {spilled}"


# ---- GPU ------------------------------------------------------------------------------------------------

# _exact_allocations (autouse: plain cudaMalloc under compute-sanitizer), _bf16_native and to_dev: test_kernels's


def poisoned(shape, dtype):
    import cupy

    out = cupy.empty(shape, dtype=(BF16 if _bf16_native() else np.uint16) if dtype == BF16 else dtype)
    out.view(np.uint16 if dtype.itemsize == 2 else np.uint32).fill(NAN_BITS[dtype.itemsize])
    return out


def to_host(a, dtype) -> np.ndarray:
    """Raw bits back to the host, as ``dtype`` (no conversion)."""
    import cupy

    h = cupy.asnumpy(a.view(np.uint16) if dtype == BF16 else a)
    return h.view(BF16) if dtype == BF16 else h


def run_gpu(dev, dtype, version=None, **kw):
    """One launch into a NaN-poisoned output; returns it on the host (the cache dtype)."""
    q = dev[0]
    out = poisoned(q.shape, dtype)
    if version is None and (dtype != BF16 or _bf16_native()):
        ops.prefill_attention(*dev, out=out, **kw)
    else:
        prefill.prefill_attention(*dev, out=out, version=version,
                                          kv_dtype="bfloat16" if dtype == BF16 else None, **kw)
    return to_host(out, dtype)


def _versions(dtype, head_dim):
    """Every version that runs this case here: the default (None), 1, and 2, 3 (sm_90), 4, 5 (sm_90) where they
    run and are not the default."""
    if dtype == F32:
        return (1,)
    import cupy

    dev, dt = cupy.cuda.Device().id, (1 if dtype == F16 else 2)
    default = prefill.default_version(dt, head_dim, dev)
    sm90 = prefill.sm90.supports(dt, head_dim, dev)
    v3 = head_dim in prefill.V3_HEAD_DIMS and prefill.v3_available(dev)
    runs = {2: True, 3: v3, 4: sm90, 5: sm90}
    return (None, 1, *(v for v, ok in runs.items() if ok and v != default))


def _runs_here(version, dtype=F16, head_dim=128) -> bool:
    import cupy

    dt = 1 if dtype == F16 else 2
    return version == prefill.default_version(dt, head_dim, cupy.cuda.Device().id) or \
        version in _versions(dtype, head_dim)


def check_batch(batch, dtype, versions=None, what=""):
    """Every version against the reference; unowned rows keep their poison bits."""
    ref = reference.prefill_attention(*batch)
    rows = ops.owned_rows(batch[4], len(batch[0]))
    dev = [to_dev(a) for a in batch]
    for version in versions or _versions(dtype, batch[0].shape[2]):
        got = run_gpu(dev, dtype, version)
        bits = got.view(np.uint16 if dtype.itemsize == 2 else np.uint32)
        assert (bits[~rows] == NAN_BITS[dtype.itemsize]).all(), f"{what} v{version}: an unowned row was written"
        assert_close(got.astype(np.float64), ref, rows, dtype, f"{what} v{version or 'default'}")


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _head_dim_grid():
    if SANITIZER:
        return [(F16, 128), (BF16, 64), (F32, 80), (F16, 256)]
    return [(dt, hd) for dt in DTYPES for hd in prefill.HEAD_DIMS]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,head_dim", _head_dim_grid(), ids=str)
def test_every_head_dim_and_dtype(dtype, head_dim):
    """Ragged lengths (1, bs-1, bs, bs+1, odd, ~3000), cached prefixes (one ending mid-block), GQA 4."""
    rng = np.random.default_rng(_seed(str(dtype), head_dim))
    long = 200 if SANITIZER else 3001
    batch = make_batch(rng, dtype, head_dim, 16, (8, 2), [1, 15, 16, 17, 37, long], [0, 0, 5, 40, 16, 0],
                       share=1, pad_rows=3)
    check_batch(batch, dtype, what=f"{dtype} hd={head_dim}")


HEADS = ((8, 8), (32, 8), (28, 4), (32, 4), (16, 1))  # GQA ratios 1, 4, 7, 8 and MQA


def _block_gqa_grid():
    if SANITIZER:
        return [(F16, 128, 2, (28, 4)), (BF16, 64, 16, (16, 1))]
    return [(dt, hd, bs, h) for dt, hd in ((F16, 128), (BF16, 64)) for bs in (1, 2, 8, 16, 32) for h in HEADS]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,head_dim,block_size,heads", _block_gqa_grid(), ids=str)
def test_block_sizes_and_gqa(dtype, head_dim, block_size, heads):
    """Blocks smaller than a K/V tile (1, 2, 8) and larger; shared prefix blocks; a padding sequence."""
    rng = np.random.default_rng(_seed(str(dtype), head_dim, block_size, heads))
    new = [1, block_size - 1, block_size, block_size + 1, 45, 100 if SANITIZER else 300]
    cached = [0, 3, block_size, 2 * block_size + 1, 0, 2 * block_size + 7]
    batch = make_batch(rng, dtype, head_dim, block_size, heads, new, cached, share=2, pad_rows=1)
    check_batch(batch, dtype, what=f"bs={block_size} heads={heads}")


@pytest.mark.gpu
@pytest.mark.skipif(SANITIZER, reason="long sequences are skipped under compute-sanitizer")
@pytest.mark.parametrize("dtype,head_dim,heads", [(F16, 64, (8, 2)), (BF16, 128, (4, 1))], ids=str)
def test_sequence_of_16k_tokens(dtype, head_dim, heads):
    rng = np.random.default_rng(16384)
    batch = make_batch(rng, dtype, head_dim, 16, heads, [16384, 7], [0, 1000])
    check_batch(batch, dtype, versions=tuple(v for v in _versions(dtype, head_dim) if v != 1), what="16k")


@pytest.mark.gpu
def test_padding_rows_and_sequences():
    """Unowned rows before qsl[0] and after qsl[-1]; n_i = 0 sequences (length 0, garbage tables) first,
    in the middle and last: nothing of theirs is read or written."""
    rng = np.random.default_rng(5)
    q, k, v, bt, qsl, cl = make_batch(rng, F16, 64, 16, (8, 2), [0, 20, 0, 33, 0], [0, 5, 0, 0, 0],
                                      lead_rows=3, pad_rows=4)
    bt[[0, 2, 4]] = -7
    check_batch((q, k, v, bt, qsl, cl), F16, what="padding")


@pytest.mark.gpu
@pytest.mark.parametrize("version", (2, 3, 4, 5))
def test_chunked_prefill_equals_one_shot(version):
    """A prompt prefilled in two chunks (the second over the first's cached K/V) gives the one-shot rows."""
    if not _runs_here(version):
        pytest.skip(f"version {version} does not run here")
    rng = np.random.default_rng(6)
    q, k, v, bt, qsl, cl = make_batch(rng, F16, 128, 16, (32, 8), [203], [0])
    whole = run_gpu([to_dev(a) for a in (q, k, v, bt, qsl, cl)], F16, version)
    first = run_gpu([to_dev(a) for a in (q[:77], k, v, bt, np.array([0, 77], np.int32), np.array([77], np.int32))],
                    F16, version)
    second = run_gpu([to_dev(a) for a in (q[77:], k, v, bt, np.array([0, 126], np.int32), cl)], F16, version)
    np.testing.assert_array_equal(np.concatenate([first, second]).view(np.uint16), whole.view(np.uint16))


@settings(max_examples=3 if SANITIZER else 30, deadline=None)
@given(data=st.data())
@pytest.mark.gpu
def test_hypothesis_small_batches(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    head_dim = data.draw(st.sampled_from(prefill.HEAD_DIMS))
    block_size = data.draw(st.sampled_from((1, 2, 4, 8, 16, 32)))
    num_kv_heads = data.draw(st.sampled_from((1, 2)))
    group = data.draw(st.sampled_from((1, 3, 4, 7, 8)))
    new = data.draw(st.lists(st.integers(0, 80), min_size=1, max_size=5))
    cached = data.draw(st.lists(st.integers(0, 100), min_size=len(new), max_size=len(new)))
    share, pad = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    batch = make_batch(rng, dtype, head_dim, block_size, (num_kv_heads * group, num_kv_heads), new, cached,
                       share=share, pad_rows=pad)
    check_batch(batch, dtype, what="hypothesis")


@pytest.mark.gpu
@pytest.mark.parametrize("version", (2, 3, 4, 5))
def test_cuda_graph_capture_and_replay_with_new_values(version):
    """One capture (check=False, shapes fixed), replayed with new lengths, prefixes, tables and data."""
    import cupy

    if not _runs_here(version, F16, 64):
        pytest.skip(f"version {version} does not run here")
    rng = np.random.default_rng(7)
    num_tokens, num_seqs, max_blocks, bs, heads, hd = 600, 4, 64, 16, (8, 2), 64
    shape = (4 * max_blocks, heads[1], bs, hd)
    dev = {"q": cupy.zeros((num_tokens, heads[0], hd), np.float16), "k": cupy.zeros(shape, np.float16),
           "v": cupy.zeros(shape, np.float16), "bt": cupy.zeros((num_seqs, max_blocks), np.int32),
           "qsl": cupy.zeros(num_seqs + 1, np.int32), "cl": cupy.zeros(num_seqs, np.int32),
           "out": cupy.zeros((num_tokens, heads[0], hd), np.float16)}
    rounds = [([100, 0, 250, 200], [0, 0, 17, 300]), ([1, 599, 0, 0], [40, 0, 0, 0]), ([0, 0, 0, 5], [0, 0, 0, 900])]

    def fill(new, cached):
        q, k, v, bt, qsl, cl = make_batch(rng, F16, hd, bs, heads, new, cached, extra_blocks=0)
        host = {"q": np.zeros((num_tokens, heads[0], hd), np.float16), "k": np.full(shape, np.nan, np.float16),
                "bt": np.full((num_seqs, max_blocks), GARBAGE_ID, np.int32)}
        host["v"] = host["k"].copy()
        host["q"][: len(q)], host["k"][: len(k)], host["v"][: len(v)] = q, k, v
        w = min(max_blocks, bt.shape[1])
        host["bt"][:, :w] = bt[:, :w]
        for name, a in (*host.items(), ("qsl", qsl), ("cl", cl)):
            dev[name].set(a)
        dev["out"].view(np.uint16).fill(NAN_BITS[2])
        return tuple(host[n] for n in ("q", "k", "v", "bt")) + (qsl, cl)

    def call():
        prefill.prefill_attention(dev["q"], dev["k"], dev["v"], dev["bt"], dev["qsl"], dev["cl"],
                                          out=dev["out"], check=False, version=version)

    pool, stream = cupy.cuda.MemoryPool(), cupy.cuda.Stream(non_blocking=True)
    fill(*rounds[0])
    with cupy.cuda.using_allocator(pool.malloc), stream:
        call()  # compiles, and warms the private pool so the capture allocates nothing new
        stream.synchronize()
        stream.begin_capture()
        call()
        graph = stream.end_capture()
    for new, cached in rounds:
        batch = fill(new, cached)
        graph.launch(stream)
        stream.synchronize()
        got = to_host(dev["out"], F16)
        rows = ops.owned_rows(batch[4], num_tokens)
        assert (got.view(np.uint16)[~rows] == NAN_BITS[2]).all()
        assert_close(got.astype(np.float64), reference.prefill_attention(*batch), rows, F16, f"replay {new}")


# ---- GPU: version 4 (Hopper) on its own grid -------------------------------------------------------------

def _sm90_or_skip(dtype=F16, head_dim=128):
    import cupy

    if not prefill.sm90.supports(1 if dtype == F16 else 2, head_dim, cupy.cuda.Device().id):
        pytest.skip("versions 4 and 5 need a compute capability 9.0 GPU")


def _sm90_grid():
    heads = HEADS if not SANITIZER else ((28, 4), (16, 1))
    return [(dt, hd, h) for dt in (F16, BF16) for hd in prefill.sm90.HEAD_DIMS for h in heads]


SM90_VERSIONS = prefill.sm90.VERSIONS


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,head_dim,heads", _sm90_grid(), ids=str)
def test_sm90_varlen_cached_prefixes_and_gqa(dtype, head_dim, heads):
    """Versions 4 and 5: varlen (1 .. 400 new tokens: partial, whole and many 128-row tiles), cached prefixes ending
    mid-block and longer than the new tokens, shared prefix blocks, a padding sequence, GQA 1/4/7/8/MQA."""
    _sm90_or_skip(dtype, head_dim)
    rng = np.random.default_rng(_seed("sm90", str(dtype), head_dim, heads))
    new = [1, 15, 130, 0, 257, 100 if SANITIZER else 400]
    cached = [0, 37, 5, 0, 300, 200 if SANITIZER else 600]
    batch = make_batch(rng, dtype, head_dim, 16, heads, new, cached, share=2, lead_rows=1, pad_rows=3)
    check_batch(batch, dtype, versions=SM90_VERSIONS, what=f"sm90 {dtype} hd={head_dim} heads={heads}")


SM90_VARIANTS = {"not persistent": (5, (("PAGEDKV_SM90_PERSISTENT", 0),)),
                 "no ping-pong": (5, (("PAGEDKV_SM90_PINGPONG", 0),)), "exp2f": (5, (("PAGEDKV_SM90_FAST_EXP", 0),)),
                 "3 stages": (5, (("PAGEDKV_SM90_STAGES", 3),)), "v4 fast exp": (4, (("PAGEDKV_SM90_V4_FAST_EXP", 1),))}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", SM90_VARIANTS, ids=str)
@pytest.mark.parametrize("dtype,head_dim", [(F16, 128), (BF16, 64)], ids=str)
def test_sm90_variants(variant, dtype, head_dim):
    """The benchmark's version-4/5 variants (compile-time and launch options) against the reference too."""
    _sm90_or_skip(dtype, head_dim)
    rng = np.random.default_rng(_seed("sm90 variant", variant, str(dtype)))
    batch = make_batch(rng, dtype, head_dim, 16, (28, 4), [1, 130, 0, 300], [0, 5, 0, 333], share=1, pad_rows=2)
    ref = reference.prefill_attention(*batch)
    rows = ops.owned_rows(batch[4], len(batch[0]))
    out = poisoned(batch[0].shape, dtype)
    version, defines = SM90_VARIANTS[variant]
    prefill.prefill_attention(*(to_dev(a) for a in batch), out=out, version=version, defines=defines,
                                      kv_dtype="bfloat16" if dtype == BF16 else None)
    got = to_host(out, dtype)
    assert (got.view(np.uint16)[~rows] == NAN_BITS[2]).all()
    assert_close(got.astype(np.float64), ref, rows, dtype, f"v{version} {variant}")


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", (1, 4, 32, 64, 256))
def test_sm90_block_sizes(block_size):
    """Versions 4 and 5 gather rows of 128-key tiles through the table: blocks smaller and larger than a tile."""
    _sm90_or_skip()
    rng = np.random.default_rng(_seed("sm90 bs", block_size))
    new, cached = [3, 129, 300 if not SANITIZER else 50], [block_size + 1, 0, 2 * block_size + 7]
    batch = make_batch(rng, F16, 128, block_size, (32, 8), new, cached, share=1, pad_rows=2)
    check_batch(batch, F16, versions=SM90_VERSIONS, what=f"sm90 bs={block_size}")


@pytest.mark.gpu
@pytest.mark.skipif(SANITIZER, reason="long sequences are skipped under compute-sanitizer")
@pytest.mark.parametrize("dtype,head_dim", [(F16, 128), (BF16, 64)], ids=str)
def test_sm90_long_prompt_over_a_long_cached_context(dtype, head_dim):
    """A 2,500-token chunk after 6,000 cached tokens (context longer than the new tokens, across many tiles)."""
    _sm90_or_skip(dtype, head_dim)
    rng = np.random.default_rng(_seed("sm90 long", str(dtype)))
    batch = make_batch(rng, dtype, head_dim, 16, (32, 8), [2500, 40], [6000, 3])
    check_batch(batch, dtype, versions=SM90_VERSIONS, what="sm90 long")


@pytest.mark.gpu
def test_default_version_on_this_gpu():
    import cupy

    dev = cupy.cuda.Device().id
    hopper = cupy.cuda.Device(dev).compute_capability == "90"
    assert prefill.default_version(1, 128, dev) == (4 if hopper else 2)
    assert prefill.default_version(2, 64, dev) == (5 if hopper else 2)
    assert prefill.default_version(1, 80, dev) == 2
    assert prefill.default_version(0, 128, dev) == 1
    if not hopper:
        with pytest.raises(ValueError, match="version 4 needs"):
            z = cupy.zeros((2, 2, 16, 64), np.float16)
            prefill.prefill_attention(cupy.zeros((3, 2, 64), np.float16), z, z,
                                              cupy.zeros((1, 2), np.int32), cupy.asarray([0, 3], np.int32),
                                              cupy.asarray([3], np.int32), version=4)


@pytest.mark.gpu
def test_gpu_range_check_errors():
    import cupy

    rng = np.random.default_rng(8)
    base = [to_dev(a) for a in make_batch(rng, F16, 64, 16, (8, 2), [20, 9], [0, 30])]
    out = poisoned(base[0].shape, F16)
    cases = [(3, lambda a: a.__setitem__((1, 2), 99999), r"block_tables\[1, 2\]=99999"),
             (4, lambda a: a.__setitem__(1, 30), r"query_start_loc\[2\]=29"),
             (4, lambda a: a.__setitem__(2, 40), r"query_start_loc\[2\]=40.*num_tokens=29"),
             (5, lambda a: a.__setitem__(1, 5), r"context_lens\[1\]=5 outside \[9, "),
             (5, lambda a: a.__setitem__(0, 10**5), r"context_lens\[0\]=100000")]
    for index, change, pattern in cases:
        args = [a.copy() for a in base]
        change(args[index])
        with pytest.raises(ValueError, match=pattern):
            ops.prefill_attention(*args, out=out)
    assert bool((out.view(np.uint16) == NAN_BITS[2]).all())  # no launch happened
    with pytest.raises(ValueError, match="head_dim must be one of"):
        z = cupy.zeros((2, 2, 16, 48), np.float16)
        ops.prefill_attention(cupy.zeros((3, 2, 48), np.float16), z, z, base[3], base[4][:3] * 0, base[5] * 0)
    with pytest.raises(ValueError, match="version 2"):
        z = cupy.zeros((2, 2, 16, 64), np.float32)
        prefill.prefill_attention(cupy.zeros((3, 2, 64), np.float32), z, z, base[3], base[4], base[5],
                                          version=2)


@pytest.mark.gpu
def test_torch_tensors_zero_copy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    batch = make_batch(rng, F16, 128, 16, (32, 8), [50, 70], [10, 0])
    ref = reference.prefill_attention(*batch)
    out = ops.prefill_attention(*(torch.from_numpy(np.ascontiguousarray(a)).cuda() for a in batch))
    assert_close(to_host(out, F16).astype(np.float64), ref, ops.owned_rows(batch[4], 120), F16, "torch")
