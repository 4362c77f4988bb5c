"""GPU tests of kernels_cu/ through pagedkv.ops / pagedkv.kernels, against the float64 references.

Every attention launch writes into an output poisoned with NaN, and every cache holds NaN in the slots a
launch must not read (unused slots of referenced blocks, unreferenced blocks, padding block 0), so a
finite result within tolerance proves the kernel wrote everything and read nothing it should not.

PAGEDKV_SANITIZER_GRID=1 shrinks the grid for compute-sanitizer runs (and skips the huge cases).
"""
import math
import os
import zlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedkv import kernels, ops
from pagedkv.reference import paged_decode_attention

pytestmark = pytest.mark.gpu
SANITIZER = os.environ.get("PAGEDKV_SANITIZER_GRID") == "1"
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BF16)
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3, BF16: 1.6e-2}
HEADS = ((8, 8), (32, 8), (32, 4), (16, 1))
NAN_BITS = {2: 0x7E00, 4: 0x7FC00000}  # a quiet NaN for 16-bit (f16; bf16 reads it as NaN too) and f32


@pytest.fixture(autouse=True, scope="module")
def _exact_allocations():
    """Under compute-sanitizer, allocate with plain cudaMalloc so out-of-bounds accesses are caught."""
    if SANITIZER:
        import cupy

        cupy.cuda.set_allocator(None)
    yield


def _bf16_native() -> bool:
    return kernels.cupy_has_bfloat16()


def to_dev(a: np.ndarray):
    """Upload; bfloat16 goes through its raw bits (a uint16 array when CuPy has no bfloat16)."""
    import cupy

    if a.dtype == BF16:
        raw = cupy.asarray(a.view(np.uint16))
        return raw.view(BF16) if _bf16_native() else raw
    return cupy.asarray(a)


def to_host_f64(a, dtype) -> np.ndarray:
    import cupy

    h = cupy.asnumpy(a.view(np.uint16) if dtype == BF16 else a)
    return (h.view(BF16) if dtype == BF16 else h).astype(np.float64)


def poisoned_like(shape, dtype):
    import cupy

    out = cupy.empty(shape, dtype=(BF16 if _bf16_native() else np.uint16) if dtype == BF16 else dtype)
    bits = out.view(np.uint16 if dtype.itemsize == 2 else np.uint32)
    bits.fill(NAN_BITS[dtype.itemsize])
    return out


def attention(q, kc, vc, bt, cl, dtype, version, **kw):
    """Run the GPU attention into a NaN-poisoned output and return it as float64 on the host."""
    out = poisoned_like(q.shape, dtype)
    if dtype == BF16 and not _bf16_native():
        kernels.paged_attention(q, kc, vc, bt, cl, version=version, out=out, kv_dtype="bfloat16", **kw)
    elif kw:
        kernels.paged_attention(q, kc, vc, bt, cl, version=version, out=out, **kw)
    else:
        ops.paged_attention(q, kc, vc, bt, cl, version=version, out=out)
    return to_host_f64(out, dtype)


def make_problem(rng, dtype, head_dim, block_size, num_qo_heads, num_kv_heads, context_lens,
                 share_prefix=0, extra_blocks=3):
    """Random q and a shuffled pool; NaN in every slot no sequence uses. Returns host arrays."""
    context_lens = np.asarray(context_lens, dtype=np.int32)
    used = [-(-int(n) // block_size) for n in context_lens]
    max_blocks = max(used)
    shared = min(share_prefix, min(used))  # every sequence starts with the same `shared` blocks
    own = [u - shared for u in used]
    num_blocks = shared + sum(own) + extra_blocks
    perm = rng.permutation(num_blocks).astype(np.int32)
    block_tables = np.zeros((len(context_lens), max_blocks), dtype=np.int32)
    nxt = shared
    for i, u in enumerate(used):
        block_tables[i, :shared] = perm[:shared]
        block_tables[i, shared:u] = perm[nxt : nxt + u - shared]
        nxt += u - shared
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    live = np.zeros((num_blocks, block_size), dtype=bool)
    for i, n in enumerate(context_lens):
        for t in range(n):
            live[block_tables[i, t // block_size], t % block_size] = True
    k.transpose(0, 2, 1, 3)[~live] = np.nan  # [num_blocks, block_size, heads, head_dim] view
    v.transpose(0, 2, 1, 3)[~live] = np.nan
    q = rng.standard_normal((len(context_lens), num_qo_heads, head_dim)).astype(np.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), block_tables, context_lens


def check_attention(rng, dtype, head_dim, block_size, heads, context_lens, versions=(1, 2), **kw):
    q, k, v, bt, cl = make_problem(rng, dtype, head_dim, block_size, *heads, context_lens,
                                   share_prefix=kw.pop("share_prefix", 0))
    ref = paged_decode_attention(q, k, v, bt, cl)
    dq, dk, dv, dbt, dcl = to_dev(q), to_dev(k), to_dev(v), to_dev(bt), to_dev(cl)
    for version in versions:
        got = attention(dq, dk, dv, dbt, dcl, dtype, version, **kw)
        assert np.isfinite(got).all(), f"v{version}: unwritten or NaN-contaminated output"
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err <= RTOL[dtype], f"v{version} {dtype} hd={head_dim} bs={block_size} {heads}: rel err {err:.3g}"


def _grid():
    if SANITIZER:
        return [(np.dtype(np.float16), 128, 16, (32, 8)), (BF16, 64, 8, (16, 1)), (np.dtype(np.float32), 256, 32, (8, 8))]
    return [(dt, hd, bs, h) for dt in DTYPES for hd in (64, 128, 256) for bs in (8, 16, 32) for h in HEADS]


@pytest.mark.parametrize("dtype,head_dim,block_size,heads", _grid(), ids=str)
def test_attention_grid(dtype, head_dim, block_size, heads):
    rng = np.random.default_rng(zlib.crc32(repr((str(dtype), head_dim, block_size, heads)).encode()))
    long = 300 if SANITIZER else 1000 + int(rng.integers(0, 100))
    lens = [1, block_size, block_size + 1, long]
    check_attention(rng, dtype, head_dim, block_size, heads, lens)
    check_attention(rng, dtype, head_dim, block_size, heads, lens, versions=(2,), num_partitions=1)
    # forced split-K: three partitions, some past the end of the short sequences, merged by the reduce kernel
    check_attention(rng, dtype, head_dim, block_size, heads, lens, versions=(2,), num_partitions=3)


@pytest.mark.skipif(SANITIZER, reason="long contexts are skipped under compute-sanitizer")
@pytest.mark.parametrize("dtype,head_dim,block_size,heads", [
    (np.dtype(np.float16), 128, 16, (32, 8)), (BF16, 128, 16, (32, 8)), (np.dtype(np.float32), 128, 16, (32, 8)),
    (np.dtype(np.float32), 256, 32, (16, 1)), (np.dtype(np.float16), 64, 8, (8, 8))], ids=str)
def test_attention_context_32768(dtype, head_dim, block_size, heads):
    rng = np.random.default_rng(32768)
    check_attention(rng, dtype, head_dim, block_size, heads, [32768, 5000])


@settings(max_examples=5 if SANITIZER else 40, deadline=None)
@given(data=st.data())
def test_attention_hypothesis_tables(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    head_dim = data.draw(st.sampled_from((64, 128, 256)))
    block_size = data.draw(st.sampled_from((8, 16, 32)))
    num_kv_heads = data.draw(st.sampled_from((1, 2, 4)))
    group = data.draw(st.sampled_from((1, 3, 4, 8, 16)))
    lens = data.draw(st.lists(st.integers(1, 400), min_size=1, max_size=6))
    share = data.draw(st.integers(0, 4))
    seed = data.draw(st.integers(0, 2**32 - 1))
    check_attention(np.random.default_rng(seed), dtype, head_dim, block_size, (num_kv_heads * group, num_kv_heads),
                    lens, share_prefix=share)


@pytest.mark.skipif(SANITIZER, reason="an 8.7 GB pool is skipped under compute-sanitizer")
def test_pool_over_2_pow_31_elements():
    """Block ids near the end of a float16 pool of > 2^31 elements: 32-bit offsets would wrap."""
    import cupy

    rng = np.random.default_rng(31)
    num_kv_heads, block_size, head_dim = 8, 16, 128
    num_blocks = 2**31 // (num_kv_heads * block_size * head_dim) + 1024
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    assert math.prod(shape) > 2**31
    kc, vc = cupy.empty(shape, np.float16), cupy.empty(shape, np.float16)
    kc.view(np.uint16).fill(NAN_BITS[2])
    vc.view(np.uint16).fill(NAN_BITS[2])
    lens = np.array([2000, 777], dtype=np.int32)
    used = -(-lens // block_size)
    ids = num_blocks - 1 - rng.permutation(int(used.sum())).astype(np.int32)
    bt = np.zeros((2, used.max()), dtype=np.int32)
    bt[0, : used[0]], bt[1, : used[1]] = ids[: used[0]], ids[used[0] :]
    k_blocks = rng.standard_normal((len(ids), *shape[1:])).astype(np.float16)
    v_blocks = rng.standard_normal((len(ids), *shape[1:])).astype(np.float16)
    for i, b in enumerate(ids.tolist()):  # block by block: plain contiguous copies
        kc[b], vc[b] = cupy.asarray(k_blocks[i]), cupy.asarray(v_blocks[i])
    # the host reference sees a small pool holding the same blocks
    small_k = np.zeros((len(ids), *shape[1:]), np.float16)
    small_v = np.zeros_like(small_k)
    small_k[:], small_v[:] = k_blocks, v_blocks
    remap = {int(b): i for i, b in enumerate(ids)}
    small_bt = np.vectorize(lambda b: remap.get(int(b), 0))(bt).astype(np.int32)
    q = rng.standard_normal((2, 32, head_dim)).astype(np.float16)
    ref = paged_decode_attention(q, small_k, small_v, small_bt, lens)
    for version in (1, 2):
        got = attention(cupy.asarray(q), kc, vc, cupy.asarray(bt), cupy.asarray(lens), np.dtype(np.float16), version)
        assert np.isfinite(got).all()
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= RTOL[np.dtype(np.float16)]
    # write_kv and copy_blocks at the end of the same pool
    last = num_blocks - 1
    new_k = cupy.asarray(rng.standard_normal((2, num_kv_heads, head_dim)).astype(np.float16))
    ops.write_kv(new_k, new_k, kc, vc, cupy.asarray([last * block_size + 3, -1]))
    assert cupy.array_equal(kc[last, :, 3], new_k[0])
    ops.copy_blocks(kc[None], vc[None], cupy.asarray([last]), cupy.asarray([num_blocks - 1000]))
    assert cupy.array_equal(kc[num_blocks - 1000], kc[last]) and cupy.array_equal(vc[num_blocks - 1000], vc[last])


def _random_cache(rng, dtype, shape):
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", (64, 128, 256, 72, 3))
def test_write_kv_exact(dtype, head_dim):
    rng = np.random.default_rng(head_dim)
    num_blocks, num_kv_heads, block_size, num_tokens = 20, 4, 16, 37
    kc, vc = _random_cache(rng, dtype, (num_blocks, num_kv_heads, block_size, head_dim)), None
    vc = _random_cache(rng, dtype, kc.shape)
    k = _random_cache(rng, dtype, (num_tokens, num_kv_heads, head_dim))
    v = _random_cache(rng, dtype, k.shape)
    slots = rng.choice(num_blocks * block_size, num_tokens, replace=False).astype(np.int64)
    slots[::5] = -1
    dk, dv, dkc, dvc = to_dev(k), to_dev(v), to_dev(kc), to_dev(vc)
    if dtype == BF16 and not _bf16_native():
        kernels.write_kv(dk, dv, dkc, dvc, to_dev(slots))
    else:
        ops.write_kv(dk, dv, dkc, dvc, to_dev(slots))
    ops.write_kv(k, v, kc, vc, slots)  # host path
    for dev, host in ((dkc, kc), (dvc, vc)):
        np.testing.assert_array_equal(to_host_f64(dev, dtype).view(np.uint64), host.astype(np.float64).view(np.uint64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 12, 4, 16, 128), (2, 10, 2, 8, 64), (1, 9, 1, 4, 3)])
def test_copy_blocks_exact(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    kp, vp = _random_cache(rng, dtype, shape), _random_cache(rng, dtype, shape)
    ids = rng.permutation(shape[1])
    src, dst = ids[:3], ids[3:6]
    dkp, dvp = to_dev(kp), to_dev(vp)
    if dtype == BF16 and not _bf16_native():
        kernels.copy_blocks(dkp, dvp, to_dev(src), to_dev(dst))
    else:
        ops.copy_blocks(dkp, dvp, to_dev(src), to_dev(dst))
    ops.copy_blocks(kp, vp, src, dst)  # host path
    for dev, host in ((dkp, kp), (dvp, vp)):
        np.testing.assert_array_equal(to_host_f64(dev, dtype).view(np.uint64), host.astype(np.float64).view(np.uint64))


def _small_problem(head_dim=128, block_size=16):
    rng = np.random.default_rng(0)
    q, k, v, bt, cl = make_problem(rng, np.dtype(np.float16), head_dim, block_size, 8, 8, [40, 17])
    return [to_dev(x) for x in (q, k, v, bt, cl)]


@pytest.mark.parametrize("version", (1, 2))
def test_attention_errors(version):
    import cupy

    q, k, v, bt, cl = _small_problem()
    bad = bt.copy()
    bad[1, 1] = k.shape[0]  # used: seq 1 has 17 tokens = 2 blocks
    with pytest.raises(ValueError, match=r"block_tables\[1, 1\]"):
        ops.paged_attention(q, k, v, bad, cl, version=version)
    bad[1, 1], bad[1, 2] = -1, 0
    with pytest.raises(ValueError, match=r"block_tables\[1, 1\]=-1"):
        ops.paged_attention(q, k, v, bad, cl, version=version)
    for length in (0, bt.shape[1] * 16 + 1):
        bad_cl = cl.copy()
        bad_cl[0] = length
        with pytest.raises(ValueError, match=rf"context_lens\[0\]={length}"):
            ops.paged_attention(q, k, v, bt, bad_cl, version=version)
    pad = bt.copy()
    pad[1, 2] = 10**6  # a padding entry (seq 1 uses 2 blocks): never checked, never read
    out = ops.paged_attention(q, k, v, pad, cl, version=version)
    assert bool(cupy.isfinite(out).all())
    rng = np.random.default_rng(1)
    q96, k96, v96, bt96, cl96 = make_problem(rng, np.dtype(np.float16), 96, 16, 8, 8, [20])
    with pytest.raises(ValueError, match="head_dim"):
        ops.paged_attention(to_dev(q96), to_dev(k96), to_dev(v96), to_dev(bt96), to_dev(cl96), version=version)


def test_cache_op_errors():
    import cupy

    kc = cupy.zeros((4, 2, 8, 64), np.float16)
    k = cupy.ones((2, 2, 64), np.float16)
    with pytest.raises(ValueError, match=r"slot_mapping\[1\]=32"):
        ops.write_kv(k, k, kc, kc.copy(), cupy.asarray([0, 32]))
    with pytest.raises(ValueError, match=r"slot_mapping\[0\]=-2"):
        ops.write_kv(k, k, kc, kc.copy(), cupy.asarray([-2, 3]))
    pool = kc[None]
    with pytest.raises(ValueError, match=r"dst_block_ids\[0\]=4"):
        ops.copy_blocks(pool, pool.copy(), cupy.asarray([0]), cupy.asarray([4]))
    with pytest.raises(ValueError, match="twice"):
        ops.copy_blocks(pool, pool.copy(), cupy.asarray([0, 1]), cupy.asarray([2, 2]))


def test_check_false_skips_the_check():
    """check=False launches without the range check (the caller vouches for the indices)."""
    q, k, v, bt, cl = _small_problem()
    out = ops.paged_attention(q, k, v, bt, cl, check=False)
    assert out.shape == q.shape


def test_compile_error_names_the_file(monkeypatch):
    monkeypatch.setattr(kernels, "cu_source", lambda filename: "this is not CUDA;")
    with pytest.raises(kernels.KernelCompileError, match=r"paged_attention\.cu"):
        kernels._module("paged_attention.cu", ("nonexistent_kernel",), (("PAGEDKV_TEST_BROKEN", 1),))


def test_torch_tensors_zero_copy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    q, k, v, bt, cl = make_problem(rng, np.dtype(np.float16), 128, 16, 32, 8, [100, 33])
    ref = paged_decode_attention(q, k, v, bt, cl)
    t = [torch.from_numpy(x).cuda() for x in (q, k, v, bt, cl)]
    out = ops.paged_attention(*t)
    got = to_host_f64(out, np.dtype(np.float16))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= RTOL[np.dtype(np.float16)]
