"""Paged = contiguous, over Hypothesis-generated block tables: shuffled, non-contiguous, shared blocks
(fork-like prefixes and whole twins), lengths 1, k*bs-1, k*bs, k*bs+1, block sizes 1/8/16/32, GQA 1/2/4/8,
head dims 64/128. Every slot no sequence owns is NaN, and so is the padding of each table, so any read
past a sequence's length shows in the result."""
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from pagedkv import KVCache
from pagedkv.kernels import ops, reference

BLOCK_SIZES = (1, 8, 16, 32)
GROUPS = (1, 2, 4, 8)
HEAD_DIMS = (64, 128)


@dataclass
class SeqPlan:
    length: int
    parent: int | None = None   # index of an earlier sequence it was forked from
    num_shared: int = 0         # leading full blocks shared with the parent
    twin: bool = False          # shares the parent's whole table and length (a partial last block too)


@dataclass
class Case:
    block_size: int
    group: int
    num_kv_heads: int
    head_dim: int
    plans: list
    perm: list       # logical block i lives in physical block perm[i]
    num_pad: int     # extra table entries past every sequence's blocks (pointing at NaN blocks)
    seed: int


def num_logical_blocks(plans, block_size):
    n = 0
    for p in plans:
        if not p.twin:
            n += -(-p.length // block_size) - p.num_shared
    return n


@st.composite
def cases(draw):
    bs = draw(st.sampled_from(BLOCK_SIZES), "block_size")
    plans = []
    for i in range(draw(st.integers(1, 3), "batch")):
        k = draw(st.integers(1, 3))
        length = draw(st.sampled_from(sorted({n for n in (1, k * bs - 1, k * bs, k * bs + 1) if n >= 1})))
        kind = draw(st.sampled_from(["own", "fork", "twin"])) if plans else "own"
        if kind == "own":
            plans.append(SeqPlan(length))
            continue
        parent = draw(st.integers(0, len(plans) - 1))
        if kind == "twin":
            plans.append(SeqPlan(plans[parent].length, parent, twin=True))
            continue
        full = min(plans[parent].length // bs, length // bs)  # only full blocks are shared by a fork
        plans.append(SeqPlan(length, parent, draw(st.integers(min(1, full), full))))
    spare = draw(st.integers(1, 3))
    num_blocks = num_logical_blocks(plans, bs) + spare
    case = Case(bs, draw(st.sampled_from(GROUPS)), draw(st.sampled_from([1, 2])), draw(st.sampled_from(HEAD_DIMS)),
                plans, draw(st.permutations(range(num_blocks))), draw(st.integers(0, 2)),
                draw(st.integers(0, 2**32 - 1)))
    event(f"block_size={bs}")
    event("shared blocks" if any(p.parent is not None and (p.num_shared or p.twin) for p in plans) else "no sharing")
    return case


def build(case: Case, dtype):
    """Contiguous K/V per sequence, and the same K/V scattered into NaN pools through shuffled tables.

    Returns ``(k_cache, v_cache, tables [batch, max_blocks] int32, lens [batch] int32, ks, vs)``.
    """
    rng = np.random.default_rng(case.seed)
    bs, h, d = case.block_size, case.num_kv_heads, case.head_dim
    num_blocks = len(case.perm)
    spare = case.perm[num_logical_blocks(case.plans, bs):]
    k_cache = np.full((num_blocks, h, bs, d), np.nan, dtype=dtype)
    v_cache = np.full_like(k_cache, np.nan)
    next_logical, tables, ks, vs = 0, [], [], []
    for p in case.plans:
        if p.twin:
            tables.append(tables[p.parent])
            ks.append(ks[p.parent])
            vs.append(vs[p.parent])
            continue
        num_own = -(-p.length // bs) - p.num_shared
        own = [case.perm[i] for i in range(next_logical, next_logical + num_own)]
        next_logical += num_own
        shared = tables[p.parent][: p.num_shared] if p.num_shared else []
        prefix = p.num_shared * bs
        k = rng.standard_normal((p.length, h, d)).astype(dtype)
        v = rng.standard_normal((p.length, h, d)).astype(dtype)
        if prefix:
            k[:prefix], v[:prefix] = ks[p.parent][:prefix], vs[p.parent][:prefix]
        tables.append(shared + own)
        ks.append(k)
        vs.append(v)
        for t in range(prefix, p.length):
            k_cache[tables[-1][t // bs], :, t % bs] = k[t]
            v_cache[tables[-1][t // bs], :, t % bs] = v[t]
    width = max(map(len, tables)) + case.num_pad
    padded = np.array([t + [spare[i % len(spare)] for i in range(width - len(t))] for t in tables], dtype=np.int32)
    lens = np.array([p.length for p in case.plans], dtype=np.int32)
    return k_cache, v_cache, padded, lens, ks, vs


def check_gather(case, dtype):
    k_cache, v_cache, tables, lens, ks, vs = build(case, dtype)
    kv_cache = None
    if np.dtype(dtype) != np.float64:
        kv_cache = KVCache(1, len(case.perm), case.block_size, case.num_kv_heads, case.head_dim, dtype, "cpu")
        kv_cache.k_pool[0], kv_cache.v_pool[0] = k_cache, v_cache
    for table, n, k, v in zip(tables, lens, ks, vs):
        for cache, want in ((k_cache, k), (v_cache, v)):
            got = reference.paged_gather(cache, table, n)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
        if kv_cache is not None:
            gk, gv = kv_cache.gather(0, table, n)
            assert gk.tobytes() == k.tobytes() and gv.tobytes() == v.tobytes()
            assert gk.shape == (n, case.num_kv_heads, case.head_dim)


OPS_TOL = {np.dtype(np.float32): (1e-5, 1e-6), np.dtype(np.float16): (2e-3, 2e-3),
           np.dtype(ml_dtypes.bfloat16): (1.6e-2, 1.6e-2)}


def check_attention(case, dtype):
    k_cache, v_cache, tables, lens, ks, vs = build(case, dtype)
    rng = np.random.default_rng(case.seed + 1)
    q = rng.standard_normal((len(lens), case.num_kv_heads * case.group, case.head_dim)).astype(dtype)
    dense = np.stack([reference.dense_attention(q[i : i + 1], k, v)[0] for i, (k, v) in enumerate(zip(ks, vs))])
    assert np.isfinite(dense).all()
    paged = reference.paged_decode_attention(q, k_cache, v_cache, tables, lens)
    assert paged.dtype == np.float64
    np.testing.assert_allclose(paged, dense, rtol=1e-12, atol=1e-13)
    if np.dtype(dtype) in OPS_TOL:
        rtol, atol = OPS_TOL[np.dtype(dtype)]
        out = ops.paged_attention(q, k_cache, v_cache, tables, lens)
        assert out.dtype == q.dtype and out.shape == q.shape
        np.testing.assert_allclose(out.astype(np.float64), dense, rtol=rtol, atol=atol)


# -- Hypothesis ----------------------------------------------------------------------------------------
@given(case=cases(), dtype=st.sampled_from([np.float64, np.float32, np.float16, ml_dtypes.bfloat16]))
def test_paged_gather_equals_contiguous(case, dtype):
    check_gather(case, dtype)


@given(case=cases(), dtype=st.sampled_from([np.float64, np.float32]))
def test_paged_attention_equals_dense(case, dtype):
    event(f"group={case.group}")
    check_attention(case, dtype)


@given(case=cases())
def test_paged_attention_equals_dense_half(case):
    check_attention(case, np.float16)


# -- the full grid, once each (Hypothesis above samples it; this makes sure every corner runs) -----------
def grid_case(block_size, group, head_dim):
    """Four sequences of lengths 1, 2bs-1, 2bs, 2bs+1; the last forked from the third (two shared blocks),
    plus a twin of the second; block ids reversed-then-interleaved so no table is contiguous."""
    n = 2 * block_size
    plans = [SeqPlan(1), SeqPlan(max(n - 1, 1)), SeqPlan(n), SeqPlan(n + 1, parent=2, num_shared=2),
             SeqPlan(max(n - 1, 1), parent=1, twin=True)]
    num_blocks = num_logical_blocks(plans, block_size) + 2
    perm = list(range(num_blocks))[::-1]
    perm = perm[::2] + perm[1::2]
    return Case(block_size, group, 2, head_dim, plans, perm, 1, seed=block_size * 1000 + group * 10 + head_dim)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_grid(block_size, group, head_dim):
    case = grid_case(block_size, group, head_dim)
    _, _, tables, _lens, _, _ = build(case, np.float32)
    assert tables[3][:2].tolist() == tables[2][:2].tolist() and tables[4].tolist() == tables[1].tolist()
    for dtype in (np.float64, np.float32, np.float16):
        check_gather(case, dtype)
        check_attention(case, dtype)


def test_a_read_past_the_length_would_show():
    """The NaN fill makes an off-by-one read visible: one more token than the sequence has is NaN."""
    case = grid_case(8, 2, 64)
    k_cache, v_cache, tables, lens, _ks, _ = build(case, np.float32)
    for table, n in zip(tables, lens):
        if n % 8:  # a partial last block: the next slot is in the same block and unwritten
            assert np.isnan(reference.paged_gather(k_cache, table, n + 1)[-1]).all()
    with np.errstate(invalid="ignore"):
        assert np.isnan(reference.paged_decode_attention(
            np.ones((len(lens), 4, 64), np.float32), k_cache, v_cache, tables, lens + 1)).any()
