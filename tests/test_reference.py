"""The float64 references against an independent naive loop, and the CPU paths of ops (write_kv,
copy_blocks, paged_attention): exact results, and bad input refused before anything is written."""
import math

import ml_dtypes
import numpy as np
import pytest

from pagedkv.kernels import ops, reference


def naive_attention(q, k, v, scale=None, causal=False):
    """One query head, one key at a time, in Python floats: nothing shared with reference.py."""
    num_q, num_qo_heads, head_dim = q.shape
    num_kv, num_kv_heads, _ = k.shape
    group = num_qo_heads // num_kv_heads
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    out = np.zeros((num_q, num_qo_heads, head_dim))
    for i in range(num_q):
        last = num_kv - num_q + i if causal else num_kv - 1
        for h in range(num_qo_heads):
            kh = h // group
            scores = [scale * math.fsum(float(q[i, h, d]) * float(k[j, kh, d]) for d in range(head_dim))
                      for j in range(last + 1)]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = math.fsum(weights)
            for d in range(head_dim):
                out[i, h, d] = math.fsum(w * float(v[j, kh, d]) for j, w in enumerate(weights)) / total
    return out


def rand(rng, *shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("num_qo_heads, num_kv_heads", [(4, 4), (8, 2), (4, 1), (6, 3)],
                         ids=["MHA", "GQA4", "MQA", "GQA2"])
@pytest.mark.parametrize("scale", [None, 0.37])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dense_attention_matches_naive_loop(num_qo_heads, num_kv_heads, scale, dtype):
    rng = np.random.default_rng(num_qo_heads * 10 + num_kv_heads)
    q, k, v = rand(rng, 3, num_qo_heads, 8, dtype=dtype), rand(rng, 7, num_kv_heads, 8, dtype=dtype), \
        rand(rng, 7, num_kv_heads, 8, dtype=dtype)
    out = reference.dense_attention(q, k, v, scale=scale)
    assert out.dtype == np.float64 and out.shape == q.shape
    np.testing.assert_allclose(out, naive_attention(q, k, v, scale), rtol=1e-12, atol=1e-13)


def test_explicit_scale_is_used():
    rng = np.random.default_rng(1)
    q, k, v = rand(rng, 1, 2, 8), rand(rng, 5, 2, 8), rand(rng, 5, 2, 8)
    default = reference.dense_attention(q, k, v)
    np.testing.assert_allclose(default, reference.dense_attention(q, k, v, scale=8**-0.5), rtol=1e-14)
    assert not np.allclose(default, reference.dense_attention(q, k, v, scale=2.0))
    np.testing.assert_allclose(reference.dense_attention(q, k, v, scale=2.0), naive_attention(q, k, v, 2.0),
                               rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("num_q, num_kv", [(3, 7), (5, 5), (1, 6)], ids=["prefix4", "no_prefix", "decode"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
def test_causal_with_prefix_offset(num_q, num_kv, heads):
    rng = np.random.default_rng(num_q * 100 + num_kv)
    q, k, v = rand(rng, num_q, heads[0], 8), rand(rng, num_kv, heads[1], 8), rand(rng, num_kv, heads[1], 8)
    out = reference.dense_attention(q, k, v, causal=True)
    np.testing.assert_allclose(out, naive_attention(q, k, v, causal=True), rtol=1e-12, atol=1e-13)
    # query i sees exactly keys 0 .. num_kv - num_q + i: the same as a non-causal call on that prefix
    for i in range(num_q):
        n = num_kv - num_q + i + 1
        np.testing.assert_allclose(out[i], reference.dense_attention(q[i : i + 1], k[:n], v[:n])[0], rtol=1e-12)
    # the last query sees everything
    np.testing.assert_allclose(out[-1], reference.dense_attention(q[-1:], k, v)[0], rtol=1e-12)


def test_dense_attention_refuses_indivisible_heads():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match=r"num_qo_heads=3.*num_kv_heads=2"):
        reference.dense_attention(rand(rng, 1, 3, 4), rand(rng, 2, 2, 4), rand(rng, 2, 2, 4))


def test_paged_gather_small_by_hand():
    # block_size 2, blocks [3 1]: tokens t0 t1 in block 3, t2 in block 1
    cache = np.full((4, 1, 2, 1), np.nan)
    cache[3, 0, :, 0] = [10.0, 11.0]
    cache[1, 0, 0, 0] = 12.0
    np.testing.assert_array_equal(reference.paged_gather(cache, [3, 1, 0], 3)[:, 0, 0], [10, 11, 12])
    np.testing.assert_array_equal(reference.paged_gather(cache, np.array([3]), 1)[:, 0, 0], [10])


# -- ops.write_kv ------------------------------------------------------------------------------------
def nan_caches(num_blocks, num_kv_heads, block_size, head_dim, dtype=np.float32):
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    return np.full(shape, np.nan, dtype=dtype), np.full(shape, np.nan, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_write_kv_exact(dtype, block_size):
    rng = np.random.default_rng(block_size)
    num_blocks, heads, head_dim = 6, 2, 8
    k_cache, v_cache = nan_caches(num_blocks, heads, block_size, head_dim, dtype)
    num_slots = num_blocks * block_size
    slots = rng.choice(num_slots, size=min(num_slots, 9), replace=False).astype(np.int64)
    slots[::4] = -1  # skipped tokens
    k, v = rand(rng, len(slots), heads, head_dim, dtype=dtype), rand(rng, len(slots), heads, head_dim, dtype=dtype)
    ops.write_kv(k, v, k_cache, v_cache, slots.astype(np.int32))
    written = set()
    for i, s in enumerate(slots):
        if s < 0:
            continue
        b, o = divmod(int(s), block_size)
        assert k_cache[b, :, o].tobytes() == k[i].tobytes() and v_cache[b, :, o].tobytes() == v[i].tobytes()
        written.add((b, o))
    for b in range(num_blocks):
        for o in range(block_size):
            if (b, o) not in written:  # every other slot is untouched
                assert np.isnan(k_cache[b, :, o].astype(np.float32)).all()
                assert np.isnan(v_cache[b, :, o].astype(np.float32)).all()


def _refused(exc_match, fn, *args, arrays):
    before = [a.copy() for a in arrays]
    with pytest.raises(ValueError, match=exc_match):
        fn(*args)
    for a, b in zip(arrays, before):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("slots, num_tokens, match", [
    ([0, 24], 2, r"slot_mapping\[1\]=24"),     # 6 blocks * 4 = 24 slots
    ([-2, 3], 2, r"slot_mapping\[0\]=-2"),
    ([5, 5], 2, "twice"),
    ([7, -1, 7], 3, "twice"),
    ([0, 1, 2], 2, r"slot_mapping 3"),         # 3 slots for 2 tokens
])
def test_write_kv_bad_slots(slots, num_tokens, match):
    rng = np.random.default_rng(3)
    k_cache, v_cache = nan_caches(6, 2, 4, 8)
    k_cache[2] = 1.5
    k, v = (rand(rng, num_tokens, 2, 8, dtype=np.float32) for _ in range(2))
    _refused(match, ops.write_kv, k, v, k_cache, v_cache, np.array(slots), arrays=[k_cache, v_cache])


def test_write_kv_bad_shapes_and_dtypes():
    rng = np.random.default_rng(4)
    k_cache, v_cache = nan_caches(6, 2, 4, 8)
    k = rand(rng, 2, 2, 8, dtype=np.float32)
    slots = np.array([0, 1])
    arrays = [k_cache, v_cache]
    _refused("float64", ops.write_kv, k.astype(np.float64), k, k_cache, v_cache, slots, arrays=arrays)
    _refused(r"\(2, 3, 8\)", ops.write_kv, k, rand(rng, 2, 3, 8, dtype=np.float32), k_cache, v_cache, slots,
             arrays=arrays)
    _refused(r"\(2, 2, 7\)", ops.write_kv, rand(rng, 2, 2, 7, dtype=np.float32), k, k_cache, v_cache, slots,
             arrays=arrays)
    _refused("float", ops.write_kv, k, k, k_cache, v_cache, np.array([0.0, 1.0]), arrays=arrays)
    _refused("differ", ops.write_kv, k, k, k_cache, v_cache[:5], slots, arrays=arrays)


# -- ops.copy_blocks ---------------------------------------------------------------------------------
def pools(rng, num_layers=2, num_blocks=8, heads=2, block_size=4, head_dim=8):
    shape = (num_layers, num_blocks, heads, block_size, head_dim)
    return rand(rng, *shape, dtype=np.float32), rand(rng, *shape, dtype=np.float32)


@pytest.mark.parametrize("src, dst", [([1], [5]), ([0, 3, 3], [7, 1, 2]), ([6, 2, 4], [0, 5, 1]), ([], [])])
def test_copy_blocks_exact(src, dst):
    rng = np.random.default_rng(5)
    k_pool, v_pool = pools(rng)
    k_exp, v_exp = k_pool.copy(), v_pool.copy()
    for s, d in zip(src, dst):
        k_exp[:, d], v_exp[:, d] = k_pool[:, s], v_pool[:, s]
    ops.copy_blocks(k_pool, v_pool, np.array(src, dtype=np.int64), np.array(dst, dtype=np.int32))
    assert k_pool.tobytes() == k_exp.tobytes() and v_pool.tobytes() == v_exp.tobytes()


@pytest.mark.parametrize("src, dst, match", [
    ([1, 2], [5, 5], "twice"),                                   # dst twice
    ([3], [3], r"\[3\].*source and a destination"),              # src == dst
    ([1, 4], [4, 6], r"\[4\].*source and a destination"),        # a chain through block 4
    ([8], [1], r"src_block_ids\[0\]=8"),
    ([1], [-1], r"dst_block_ids\[0\]=-1"),
    ([1, 2], [3], r"\(2,\).*\(1,\)"),
])
def test_copy_blocks_bad_input(src, dst, match):
    rng = np.random.default_rng(6)
    k_pool, v_pool = pools(rng)
    _refused(match, ops.copy_blocks, k_pool, v_pool, np.array(src), np.array(dst), arrays=[k_pool, v_pool])


# -- ops.paged_attention: bad input ------------------------------------------------------------------
@pytest.fixture
def attn_args():
    rng = np.random.default_rng(7)
    k_cache, v_cache = rand(rng, 6, 2, 4, 8, dtype=np.float32), rand(rng, 6, 2, 4, 8, dtype=np.float32)
    q = rand(rng, 2, 4, 8, dtype=np.float32)
    tables = np.array([[3, 1, 0], [5, 0, 0]], dtype=np.int32)
    lens = np.array([7, 2], dtype=np.int32)
    return q, k_cache, v_cache, tables, lens


def test_paged_attention_cpu_returns_q_dtype(attn_args):
    q, k_cache, v_cache, tables, lens = attn_args
    out = ops.paged_attention(q, k_cache, v_cache, tables, lens)
    assert out.dtype == np.float32 and out.shape == q.shape
    buf = np.full_like(q, np.nan)
    assert ops.paged_attention(q, k_cache, v_cache, tables, lens, out=buf) is buf
    np.testing.assert_array_equal(buf, out)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(tables=np.array([[3, 99, 0], [5, 0, 0]], np.int32)), r"block_tables\[0, 1\]=99"),
    (lambda a: a.update(tables=np.array([[3, 1, 0], [-1, 0, 0]], np.int32)), r"block_tables\[1, 0\]=-1"),
    (lambda a: a.update(lens=np.array([13, 2], np.int32)), r"context_lens\[0\]=13"),   # 3 blocks * 4 = 12
    (lambda a: a.update(lens=np.array([7, 0], np.int32)), r"context_lens\[1\]=0"),
    (lambda a: a.update(q=a["q"].astype(np.float16)), "float16"),
    (lambda a: a.update(q=a["q"][:, :3]), "num_qo_heads=3"),
    (lambda a: a.update(q=a["q"][..., :4]), r"\(2, 4, 4\)"),
    (lambda a: a.update(q=a["q"][:1]), "batch mismatch"),
    (lambda a: a.update(tables=a["tables"].astype(np.float32)), "float32"),
    (lambda a: a.update(lens=a["lens"][:, None]), "context_lens"),
    (lambda a: a.update(version=5), "5"),
])
def test_paged_attention_bad_input(attn_args, change, match):
    q, k_cache, v_cache, tables, lens = attn_args
    args = {"q": q, "tables": tables, "lens": lens, "version": 2}
    change(args)
    out = np.full_like(q, 7.0)
    before = k_cache.tobytes(), v_cache.tobytes()
    with pytest.raises(ValueError, match=match):
        ops.paged_attention(args["q"], k_cache, v_cache, args["tables"], args["lens"], version=args["version"],
                            out=out if args["q"].shape == q.shape and args["q"].dtype == q.dtype else None)
    assert (k_cache.tobytes(), v_cache.tobytes()) == before
    assert (out == 7.0).all()  # nothing written to the output either


def test_paged_attention_bad_out(attn_args):
    q, k_cache, v_cache, tables, lens = attn_args
    with pytest.raises(ValueError, match="float64"):
        ops.paged_attention(q, k_cache, v_cache, tables, lens, out=np.zeros(q.shape))

