"""Cascade attention (issue 17): the float64 references, the plan and its detection (CPU, Hypothesis over random
group structures), and kernels_cu/cascade_attention.cu against the references (GPU, marked ``gpu``).

Every GPU launch writes into NaN-poisoned outputs over caches holding NaN in every slot no row uses and block
tables whose unused entries are out of range: a finite result within tolerance proves every row was written and
nothing unused was read.
"""
import os
import shutil
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedkv import cascade
from pagedkv.kernels import reference, reference_cascade
from pagedkv.cascade import CascadePlan, CascadeRule, find_groups

BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
RTOL = {F32: 2e-5, F16: 3e-3, BF16: 2e-2}  # norm-wise over all rows
ROW_RTOL = {F32: 2e-4, F16: 2e-2, BF16: 8e-2}  # worst (row, head)
GARBAGE_ID = 1 << 30


# ---- batches ---------------------------------------------------------------------------------------------

def make_batch(rng, dtype, head_dim, block_size, heads, groups, loners, extra_blocks=3):
    """A random decode batch with groups sharing leading blocks; every unused cache slot is NaN.

    groups: ``(shared_blocks, prefix_len, own_lens)`` per group: ``shared_blocks`` block ids head every member's
        table, the group's prefix pass covers keys ``[0, prefix_len)`` (mid-block allowed), member ``i`` has
        ``shared_blocks * block_size + own_lens[i]`` keys (own_lens[i] may be negative down to ``prefix_len -
        shared_blocks * block_size``: an empty suffix).
    loners: key counts of rows in no group. Rows are shuffled so groups are not contiguous.
    Returns (q, k_cache, v_cache, block_tables, context_lens, plan).
    """
    num_qo_heads, num_kv_heads = heads
    count = [0]

    def take(n):  # n fresh block ids (renamed through a random permutation below)
        count[0] += n
        return np.arange(count[0] - n, count[0])

    rows = []  # (table, length, group index or -1)
    for g, (shared, plen, own) in enumerate(groups):
        assert 0 < plen <= shared * block_size and min(own) >= plen - shared * block_size, (shared, plen, own)
        shared_ids = take(shared)
        for o in own:
            length = shared * block_size + o
            table = shared_ids[:-(-length // block_size)] if o <= 0 else np.r_[shared_ids, take(-(-o // block_size))]
            rows.append((table, length, g))
    for n in loners:
        rows.append((take(-(-n // block_size)), n, -1))
    ids_needed = count[0] + extra_blocks
    perm = rng.permutation(ids_needed).astype(np.int32)
    rows = [(perm[t], n, g) for t, n, g in rows]
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    width = max(1, max(len(t) for t, _, _ in rows)) + 2
    tables = np.full((len(rows), width), GARBAGE_ID, dtype=np.int32)
    lens = np.zeros(len(rows), dtype=np.int32)
    for r, (t, n, _) in enumerate(rows):
        tables[r, :len(t)], lens[r] = t, n
    plan_groups = [(np.flatnonzero([g == gi for _, _, g in rows]), plen) for gi, (_, plen, _) in enumerate(groups)]
    plan = CascadePlan.from_groups(plan_groups, len(rows))
    shape = (ids_needed, num_kv_heads, block_size, head_dim)
    k, v = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    live = np.zeros((ids_needed, block_size), dtype=bool)
    for r in range(len(rows)):
        t = np.arange(lens[r])
        live[tables[r, t // block_size], t % block_size] = True
    k.transpose(0, 2, 1, 3)[~live] = np.nan
    v.transpose(0, 2, 1, 3)[~live] = np.nan
    q = rng.standard_normal((len(rows), num_qo_heads, head_dim)).astype(np.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), tables, lens, plan


def plan_args(plan):
    return plan.group_starts, plan.group_rows, plan.prefix_lens, plan.suffix_starts


GROUPS = [(4, 61, [3, 17, 1]), (2, 32, [0, 5]), (6, 96, [40] * 9)]  # mid-block prefix, an empty suffix, 9 rows


# ---- CPU: references ---------------------------------------------------------------------------------------

def test_reference_cascade_equals_plain_decode():
    rng = np.random.default_rng(0)
    q, k, v, bt, cl, plan = make_batch(rng, F64, 16, 16, (8, 2), GROUPS, [5, 70])
    got = reference_cascade.cascade_attention(q, k, v, bt, cl, *plan_args(plan), scale=0.2)
    want = reference.paged_decode_attention(q, k, v, bt, cl, scale=0.2)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_attention_lse_by_definition():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((3, 4, 8)), rng.standard_normal((5, 2, 8)), rng.standard_normal((5, 2, 8))
    out, lse = reference_cascade.attention_lse(q, k, v, 0.5)
    for i in range(3):
        for h in range(4):
            s = k[:, h // 2] @ q[i, h] * 0.5
            np.testing.assert_allclose(lse[i, h], np.log(np.exp(s).sum()), rtol=1e-12)
            np.testing.assert_allclose(out[i, h], np.exp(s - lse[i, h]) @ v[:, h // 2], rtol=1e-12)
    out, lse = reference_cascade.attention_lse(q, k[:0], v[:0], 0.5)
    assert not out.any() and np.isneginf(lse).all()


def test_merge_of_a_split_is_the_whole():
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((3, 4, 8)), rng.standard_normal((9, 2, 8)), rng.standard_normal((9, 2, 8))
    whole = reference_cascade.attention_lse(q, k, v, 0.3)
    parts = [reference_cascade.attention_lse(q, k[a:b], v[a:b], 0.3) for a, b in ((0, 4), (4, 4), (4, 9))]
    out, lse = reference_cascade.merge_attn_states([p[0] for p in parts], [p[1] for p in parts])
    np.testing.assert_allclose(out, whole[0], rtol=1e-12)
    np.testing.assert_allclose(lse, whole[1], rtol=1e-12)


def test_float32_op_host_path_within_1e5_of_plain():
    rng = np.random.default_rng(3)
    q, k, v, bt, cl, plan = make_batch(rng, F32, 32, 16, (4, 4), GROUPS, [9])
    got = cascade.cascade_attention(q, k, v, bt, cl, *plan_args(plan))
    from pagedkv.kernels import ops

    want = ops.paged_attention(q, k, v, bt, cl)
    assert got.dtype == F32
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


# ---- CPU: the plan, detection and the rule ------------------------------------------------------------------

def test_plan_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="group_rows"):
        CascadePlan([0, 2], [1, 1], [16], [0, 16])
    with pytest.raises(ValueError, match="suffix_starts\\[0\\]"):
        CascadePlan([0, 2], [1, 2], [16], [16, 16, 16])
    with pytest.raises(ValueError, match="group_starts"):
        CascadePlan([1, 2], [0, 1], [16], [16, 0])
    with pytest.raises(ValueError, match="prefix_lens"):
        CascadePlan([0, 2], [0, 1], [-16], [-16, -16])


def test_check_tables():
    bt = np.array([[5, 6, 7], [5, 6, 9], [5, 8, 1]], dtype=np.int32)
    plan = CascadePlan.from_groups([([0, 1], 32)], 3)
    plan.check_tables(bt, [40, 33, 5], 16)
    with pytest.raises(ValueError, match="row 1"):
        plan.check_tables(bt, [40, 32, 5], 16)  # row 1's newest key would sit in the prefix
    with pytest.raises(ValueError, match="does not share"):
        CascadePlan.from_groups([([0, 2], 32)], 3).check_tables(bt, [40, 40, 40], 16)
    with pytest.raises(ValueError, match="multiple"):
        CascadePlan.from_groups([([0, 1], 20)], 3).check_tables(bt, [40, 40, 40], 16)


def test_find_groups_whole_blocks_only():
    # rows 0-2 share blocks 5, 6 (row 2 also 7, but alone); row 3 shares 5 only; rows 4, 5 share 9; row 6 alone
    bt = np.array([[5, 6, 1, 0], [5, 6, 2, 0], [5, 6, 7, 3], [5, 4, 0, 0], [9, 8, 0, 0], [9, 8, 0, 0],
                   [11, 0, 0, 0]], dtype=np.int32)
    lens = np.array([40, 33, 60, 20, 17, 32, 15])
    groups = find_groups(bt, lens, 16)
    # group of first block 5: rows 0-3; row 3 has 1 usable block -> prefix 1 block. Rows 4, 5: row 4 has 17 keys
    # (1 usable), row 5 32 keys (1 usable: its 2nd block holds its newest key) -> 1 block; row 6: 0 usable blocks
    assert [(g.tolist(), p) for g, p in groups] == [([0, 1, 2, 3], 16), ([4, 5], 16)]
    assert [(g.tolist(), p) for g, p in find_groups(bt, lens, 16, min_prefix_blocks=2)] == [([0, 1, 2], 32)]
    assert find_groups(bt[:1], lens[:1], 16) == []


def test_rule():
    bt = np.tile(np.arange(40, dtype=np.int32), (8, 1))
    bt[:, 30:] += np.arange(8, dtype=np.int32)[:, None] * 100  # rows differ from block 30 on
    lens = np.full(8, 32 * 16 + 3)
    plan = CascadeRule(min_saved_tokens=0).plan(bt, lens, 16)
    assert plan.prefix_lens.tolist() == [480] and plan.group_rows.tolist() == list(range(8))
    assert plan.saved_tokens() == 7 * 480
    assert CascadeRule(min_saved_tokens=7 * 480 + 1).plan(bt, lens, 16) is None
    assert CascadeRule(min_prefix_tokens=481, min_saved_tokens=0).plan(bt, lens, 16) is None
    with pytest.raises(ValueError, match="min_group_size"):
        CascadeRule(min_group_size=1)


@st.composite
def structures(draw):
    block_size = draw(st.sampled_from([1, 4, 16]))
    groups = []
    for _ in range(draw(st.integers(0, 4))):
        shared = draw(st.integers(1, 5))
        plen = draw(st.integers(1, shared * block_size))
        size = draw(st.integers(1, 5))  # groups of one too
        own = draw(st.lists(st.integers(plen - shared * block_size, 2 * block_size + 3), min_size=size,
                            max_size=size))
        groups.append((shared, plen, own))
    loners = draw(st.lists(st.integers(1, 5 * block_size), max_size=3))
    if not groups and not loners:
        loners = [1]
    return block_size, groups, loners, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60)
@given(structures())
def test_hypothesis_cascade_reference_equals_plain(structure):
    """Random group structures (mid-block prefixes, groups of one, empty suffixes, loners): cascade == plain,
    float64 and float32 (within 1e-5 relative, the CPU reference path of the op)."""
    block_size, groups, loners, seed = structure
    rng = np.random.default_rng(seed)
    q, k, v, bt, cl, plan = make_batch(rng, F64, 8, block_size, (4, 2), groups, loners)
    want = reference.paged_decode_attention(q, k, v, bt, cl)
    np.testing.assert_allclose(reference_cascade.cascade_attention(q, k, v, bt, cl, *plan_args(plan)), want,
                               rtol=1e-10, atol=1e-10)
    got32 = cascade.cascade_attention(q.astype(F32), k.astype(F32), v.astype(F32), bt, cl, *plan_args(plan))
    assert np.abs(got32 - want).max() <= 1e-5 * np.abs(want).max()


@settings(max_examples=60)
@given(structures())
def test_hypothesis_found_groups_are_valid_and_maximal(structure):
    """find_groups on tables built with known sharing: every group passes check_tables, and every built group
    with >= 2 rows whose members keep a usable shared block is found."""
    block_size, groups, loners, seed = structure
    rng = np.random.default_rng(seed)
    _, _, _, bt, cl, _ = make_batch(rng, F32, 8, block_size, (2, 1), groups, loners)
    found = find_groups(bt, cl, block_size)
    plan = CascadePlan.from_groups(found, len(cl))
    plan.check_tables(bt, cl, block_size)
    usable = (cl.astype(np.int64) - 1) // block_size
    grouped = set(plan.group_rows.tolist())
    for r in range(len(cl)):
        partners = [s for s in range(len(cl)) if s != r and usable[s] >= 1 and usable[r] >= 1 and bt[s, 0] == bt[r, 0]]
        assert (r in grouped) == bool(partners)


# ---- GPU ------------------------------------------------------------------------------------------------------

def _dev(a):
    import cupy

    if a.dtype == BF16:
        return cupy.asarray(a.view(np.uint16)).view(BF16)
    return cupy.asarray(a)


def _host64(a):
    import cupy

    return cupy.asnumpy(a.view(np.uint16)).view(BF16).astype(np.float64) if a.dtype == BF16 else \
        cupy.asnumpy(a).astype(np.float64)


def _poisoned(shape, dtype):
    import cupy

    out = cupy.empty(shape, dtype=dtype)
    out.view(np.uint16 if dtype.itemsize == 2 else np.uint32).fill(0x7E00 if dtype.itemsize == 2 else 0x7FC00000)
    return out


def assert_close(got, ref, dtype, what=""):
    assert np.isfinite(got).all(), f"{what}: unwritten or NaN-contaminated rows {np.flatnonzero(~np.isfinite(got).all(axis=(1, 2)))}"
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    per = np.linalg.norm(got - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)
    assert err <= RTOL[dtype] and per.max() <= ROW_RTOL[dtype], \
        f"{what}: rel err {err:.3g}, worst (row, head) {np.unravel_index(per.argmax(), per.shape)} {per.max():.3g}"


GPU_CASES = [  # (dtype, head_dim, block_size, heads, groups, loners)
    (F16, 64, 16, (32, 8), [(250, 4000, [3, 17, 42] * 10)], []),  # one long shared document, 30 rows
    (F16, 128, 16, (32, 8), GROUPS, [5, 300]),
    (BF16, 64, 16, (16, 2), GROUPS + [(3, 48, [7])], [33]),  # a group of one
    (F16, 64, 8, (8, 8), [(20, 157, [1, 2, 3, 4])], [1]),  # MHA, mid-block prefix
    (BF16, 128, 32, (28, 4), [(9, 288, [0] * 3 + [50] * 60)], [9]),  # group 7 (two head tiles), 63 rows, empty suffixes
    (F16, 96, 16, (12, 2), [(12, 190, [5] * 5)], []),
    (F16, 256, 16, (8, 2), [(10, 160, [5] * 4)], [3]),  # rows kernel does the prefix (no tensor-core 256)
    (F32, 64, 16, (8, 2), GROUPS, [20]),
    (F32, 128, 16, (32, 8), [(64, 1024, [9] * 16)], [100]),
]


QUICK = [0, 1, 2, 4, 7]  # PAGEDKV_CASCADE_QUICK=1 (one device call's budget): fewer instantiations to compile
CASE_IDS = QUICK if os.environ.get("PAGEDKV_CASCADE_QUICK") == "1" else range(len(GPU_CASES))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_gpu_cascade_matches_reference(case, num_splits):
    dtype, head_dim, block_size, heads, groups, loners = GPU_CASES[case]
    rng = np.random.default_rng(100 + case)
    q, k, v, bt, cl, plan = make_batch(rng, dtype, head_dim, block_size, heads, groups, loners)
    want = reference.paged_decode_attention(q, k, v, bt, cl)
    out = _poisoned(q.shape, dtype)
    cascade.cascade_attention(_dev(q), _dev(k), _dev(v), _dev(bt), _dev(cl), *map(_dev, plan_args(plan)), out=out,
                              num_splits=num_splits)
    assert_close(_host64(out), want, dtype, f"case {case}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_gpu_kernel_parts_match_reference(dtype):
    """Each kernel on its own: prefix partials (every split), the suffix part, the merge with its lse."""
    import cupy

    from pagedkv.kernels import cascade as kc

    rng = np.random.default_rng(7)
    q, k, v, bt, cl, plan = make_batch(rng, dtype, 64, 16, (32, 8), GROUPS, [5])
    dq, dk, dv, dbt, dcl = map(_dev, (q, k, v, bt, cl))
    starts, rows, plens, sufs = map(_dev, plan_args(plan))
    dt = 1 if dtype == F16 else 2
    splits = 3
    o = cupy.full((splits + 1, *q.shape), np.nan, dtype=np.float32)
    lse = cupy.full((splits + 1, *q.shape[:2]), np.nan, dtype=np.float32)
    kc.prefix_partials(o[:splits], lse[:splits], dq, dk, dv, dbt, starts, rows, plens, 0.125, dt)
    kc.rows_partial(o[splits], lse[splits], dq, dk, dv, dbt, sufs, dcl, 0.125, dt)
    grouped = plan.group_rows
    ref_o, ref_lse = reference_cascade.prefix_attention(q, k, v, bt, *plan_args(plan)[:3], scale=0.125)
    host_o, host_lse = cupy.asnumpy(o).astype(np.float64), cupy.asnumpy(lse).astype(np.float64)
    loners = np.setdiff1d(np.arange(len(cl)), grouped)
    assert np.isnan(host_lse[:splits, loners]).all()  # rows of no group: prefix parts never written
    m_o, m_lse = reference_cascade.merge_attn_states(host_o[:splits, grouped], host_lse[:splits, grouped])
    assert_close(m_o, ref_o[grouped], dtype, "prefix")
    np.testing.assert_allclose(m_lse, ref_lse[grouped], rtol=1e-3, atol=1e-3)
    suf_o, suf_lse = reference_cascade.rows_attention(q, k, v, bt, plan.suffix_starts, cl, scale=0.125)
    nonempty = np.isfinite(suf_lse)
    np.testing.assert_allclose(host_lse[splits][nonempty], suf_lse[nonempty], rtol=1e-3, atol=1e-3)
    assert np.isneginf(host_lse[splits][~nonempty]).all()
    out, lse_out = _poisoned(q.shape, dtype), cupy.full(q.shape[:2], np.nan, dtype=np.float32)
    kc.merge_partials(out, lse_out, o, lse, sufs, dt)
    want = reference.paged_decode_attention(q, k, v, bt, cl, scale=0.125)
    assert_close(_host64(out), want, dtype, "merged")
    whole_lse = reference_cascade.rows_attention(q, k, v, bt, None, cl, scale=0.125)[1]
    np.testing.assert_allclose(cupy.asnumpy(lse_out), whole_lse, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@settings(max_examples=25)
@given(structures())
def test_gpu_hypothesis_group_structures(structure):
    block_size, groups, loners, seed = structure
    rng = np.random.default_rng(seed)
    q, k, v, bt, cl, plan = make_batch(rng, F16, 64, block_size, (8, 2), groups, loners)
    want = reference.paged_decode_attention(q, k, v, bt, cl)
    out = _poisoned(q.shape, F16)
    cascade.cascade_attention(_dev(q), _dev(k), _dev(v), _dev(bt), _dev(cl), *map(_dev, plan_args(plan)), out=out)
    assert_close(_host64(out), want, F16, str(structure))


@pytest.mark.gpu
def test_gpu_float32_within_1e5_of_plain_decode():
    rng = np.random.default_rng(11)
    q, k, v, bt, cl, plan = make_batch(rng, F32, 128, 16, (32, 8), [(64, 1024, [9] * 16)], [100])
    from pagedkv.kernels import ops

    got = cascade.cascade_attention(_dev(q), _dev(k), _dev(v), _dev(bt), _dev(cl), *map(_dev, plan_args(plan)))
    want = ops.paged_attention(_dev(q), _dev(k), _dev(v), _dev(bt), _dev(cl))
    got, want = _host64(got), _host64(want)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.gpu
def test_gpu_graph_replay_with_new_groups():
    """One captured launch, replayed with a different grouping and lengths written into the same buffers."""
    import cupy

    rng = np.random.default_rng(12)
    batches = [make_batch(rng, F16, 64, 16, (16, 4), gs, lo) for gs, lo in
               (([(10, 160, [4] * 6)], [3, 9]), ([(4, 64, [1, 2]), (6, 80, [3, 3, 3])], [40]))]
    num_rows = max(len(b[4]) for b in batches)
    width = max(b[3].shape[1] for b in batches)
    num_blocks = max(b[1].shape[0] for b in batches)
    dq = cupy.zeros((num_rows, 16, 64), dtype=F16)
    dk, dv = (cupy.zeros((num_blocks, 4, 16, 64), dtype=F16) for _ in range(2))
    dbt, dcl = cupy.zeros((num_rows, width), dtype=np.int32), cupy.ones(num_rows, dtype=np.int32)
    starts, grp_rows = cupy.zeros(num_rows // 2 + 2, dtype=np.int32), cupy.zeros(num_rows, dtype=np.int32)
    plens, sufs = cupy.zeros(num_rows // 2 + 1, dtype=np.int32), cupy.zeros(num_rows, dtype=np.int32)
    out = cupy.zeros(dq.shape, dtype=F16)
    stream = cupy.cuda.Stream(non_blocking=True)
    graph = None
    for q, k, v, bt, cl, plan in batches:
        n = len(cl)
        dq[:n], dk[:k.shape[0]], dv[:v.shape[0]] = _dev(q), _dev(np.nan_to_num(k)), _dev(np.nan_to_num(v))
        dbt[:], dcl[:] = 0, 1
        dbt[:n, :bt.shape[1]], dcl[:n] = _dev(np.where(bt == GARBAGE_ID, 0, bt)), _dev(cl)
        starts[:] = plan.group_starts[-1]
        starts[:plan.num_groups + 1], plens[:] = _dev(plan.group_starts), 0
        plens[:plan.num_groups], sufs[:] = _dev(plan.prefix_lens), 0
        grp_rows[:len(plan.group_rows)], sufs[:n] = _dev(plan.group_rows), _dev(plan.suffix_starts)
        if graph is None:
            with stream:
                cascade.cascade_attention(dq, dk, dv, dbt, dcl, starts, grp_rows, plens, sufs, out=out)  # warm-up
                stream.begin_capture()
                cascade.cascade_attention(dq, dk, dv, dbt, dcl, starts, grp_rows, plens, sufs, out=out)
                graph = stream.end_capture()
        out.fill(np.nan)
        graph.launch(stream)
        stream.synchronize()
        want = reference.paged_decode_attention(q, np.nan_to_num(k), np.nan_to_num(v), bt, cl)
        assert_close(_host64(out)[:n], want, F16, "replay")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_compiles_without_spills(tmp_path):
    """Every instantiation the launchers use: sm_90, no spill stores."""
    from pagedkv.kernels import cascade as kc

    names = sorted({n for dt in (0, 1, 2) for hd in (64, 128) for n in kc.launched_names(dt, hd)})
    src = tmp_path / "inst.cu"
    root = Path(__file__).resolve().parents[1] / "kernels_cu"
    src.write_text(f'#include "{root / kc.FILENAME}"\n' + "".join(_instantiation(n) for n in names))
    res = subprocess.run(["nvcc", "-arch=sm_90", "--cubin", "-Xptxas", "-v", "-std=c++17", f"-I{root}", str(src),
                          "-o", str(tmp_path / "inst.cubin")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    spills = [line for line in res.stderr.splitlines() if "spill" in line and not line.strip().startswith("0 bytes")
              and " 0 bytes spill stores" not in line]
    assert not spills, spills


def _instantiation(name: str) -> str:
    kernel, params = name.split("<")
    args = {"cascade_prefix_kernel": "float*, float*, const unsigned short*, const unsigned short*, "
                                     "const unsigned short*, const int*, const int*, const int*, const int*, int, int, "
                                     "int, int, int, int, int, float",
            "cascade_rows_kernel": "float*, float*, KV<{dt}>::T*, const float*, const float*, int, const KV<{dt}>::T*, "
                                   "const KV<{dt}>::T*, const KV<{dt}>::T*, const int*, const int*, const int*, int, "
                                   "int, int, int, int, float",
            "cascade_merge_kernel": "KV<{dt}>::T*, float*, const float*, const float*, const int*, int, int, int"}
    dt = params.split(",")[0]
    return f"template __global__ void {name}({args[kernel].format(dt=dt)});\n"

