"""Tests of kernels_cu/ through pagedkv.kernels.ops / pagedkv.kernels.decode, against the float64 references.

Every attention launch writes into an output poisoned with NaN, and every cache holds NaN in the slots a
launch must not read (unused slots of referenced blocks, unreferenced blocks, padding block 0), so a
finite result within tolerance proves the kernel wrote everything and read nothing it should not.

GPU tests carry the ``gpu`` mark. The CPU tests at the top check kernel 3's balanced plan: a line-by-line
port of the kernel's walk (plan, pieces, partial slots, merge records, merge) in float64 against the
reference, and against :func:`pagedkv.kernels.decode_plan.balanced_plan`.

PAGEDKV_SANITIZER_GRID=1 shrinks the grid for compute-sanitizer runs (and skips the huge cases). With
pytest-xdist, ``--dist loadgroup`` keeps each (dtype, head_dim) on one worker, so each worker compiles
only its own kernels (CuPy recompiles templated modules in every process).
"""
import math
import os
import zlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedkv.kernels import cache_ops, compile, decode, decode_plan, ops
from pagedkv.kernels.reference import paged_decode_attention

gpu = pytest.mark.gpu
SANITIZER = os.environ.get("PAGEDKV_SANITIZER_GRID") == "1"
BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
DTYPES = (F32, F16, BF16)
RTOL = {F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}
HEADS = ((8, 8), (32, 8), (32, 4), (16, 1))
ORIGINAL_HEAD_DIMS = (64, 128, 256)  # the full (block size x heads) cross; the others get one case of each
NAN_BITS = {2: 0x7E00, 4: 0x7FC00000}  # a quiet NaN for 16-bit (f16; bf16 reads it as NaN too) and f32
# (keyword arguments, versions) run on every grid case: defaults (None: the dispatcher), forced split-K,
# forced balanced splits, the dispatcher's partition plan forced (small grids: partitions and merges)
VARIANTS = (({}, (1, 2, 3, None)), ({"num_partitions": 1}, (2,)), ({"num_partitions": 3}, (2,)),
            ({"num_ctas": 7, "min_tiles": 1}, (3,)), ({"num_ctas": 1}, (3,)), ({"mode": 2}, (None,)),
            ({"mode": 2, "num_ctas": 7}, (None,)), ({"mode": 2, "num_ctas": 1}, (None,)), ({"group_tile": 4}, (None,)))


def _group(name: str) -> list:
    """``xdist_group`` when pytest-xdist is installed (the marker is unknown otherwise)."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        return []
    return [pytest.mark.xdist_group(name)]


# ---- CPU: kernel 3's plan, ported from the kernel ------------------------------------------------

def emulate_v3(q, k, v, block_tables, context_lens, tile_tokens, gt, num_blocks, min_tiles, order=None):
    """Kernel 3 in float64, following the CUDA code's control flow step by step; thread blocks run one
    after another in ``order`` (any order: the merge is done by whichever piece finishes last).

    Returns (out, {(split block, seq, head group): pieces} of the merged sequences, counters after)."""
    batch, num_qo_heads, head_dim = q.shape
    num_kv_heads, block_size = k.shape[1], k.shape[2]
    group = num_qo_heads // num_kv_heads
    q_tiles = -(-group // gt)
    num_hg = num_kv_heads * q_tiles
    tiles_of = lambda n: -(-n // tile_tokens) if n > 0 else 0  # noqa: E731
    total = sum(tiles_of(int(n)) for n in context_lens)
    units = num_hg * total
    per_block = max(-(-units // num_blocks), max(min_tiles, 1))
    out = np.full(q.shape, np.nan)
    part_out = np.full((2 * num_blocks, gt, head_dim), np.nan)
    part_ml = np.full((2 * num_blocks, gt, 2), np.nan)
    counters, merged = np.zeros(num_blocks, dtype=int), {}
    scale = head_dim**-0.5 * math.log2(math.e)
    for b in (range(num_blocks) if order is None else order):
        u0 = b * per_block
        if u0 >= units:
            continue
        num_units = min(per_block, units - u0)
        hg0, s0 = divmod(u0, total)
        cum = 0  # the plan's search: the sequence holding stream position s0
        for i in range(batch):
            n = tiles_of(int(context_lens[i]))
            if s0 < cum + n:
                w_seq, w_item = i, cum - s0
                break
            cum += n
        w_hg, w_len = hg0, int(context_lens[w_seq])
        for u in range(num_units):  # describe(u), then the math of unit u
            while u >= w_item + tiles_of(w_len):
                w_item += tiles_of(w_len)
                w_seq += 1
                if w_seq == batch:
                    w_seq, w_hg = 0, w_hg + 1
                w_len = int(context_lens[w_seq])
            w_n, j = tiles_of(w_len), u - w_item
            kv_head, q_tile = divmod(w_hg, q_tiles)
            head0, num_q = kv_head * group + q_tile * gt, min(gt, group - q_tile * gt)
            split_block = (u0 + w_item) // per_block
            pieces = (u0 + w_item + w_n - 1) // per_block - split_block + 1
            if u == 0 or j == 0:  # FIRST
                seq_start, tokens = j == 0, []
            tokens += range(j * tile_tokens, min(w_len, (j + 1) * tile_tokens))
            if not (u == num_units - 1 or j == w_n - 1):  # not LAST
                continue
            slot = 2 * b + (1 if seq_start else 0)
            t = np.array(tokens)
            rows = block_tables[w_seq, t // block_size], t % block_size
            kk, vv = k[rows[0], kv_head, rows[1]], v[rows[0], kv_head, rows[1]]  # [tokens, head_dim]
            for g in range(num_q):
                sc = kk @ q[w_seq, head0 + g] * scale
                m = sc.max()
                p = np.exp2(sc - m)
                if pieces == 1:
                    out[w_seq, head0 + g] = p @ vv / p.sum()
                else:
                    part_out[slot, g], part_ml[slot, g] = p @ vv, (m, p.sum())
            if pieces == 1:
                continue
            counters[split_block] += 1
            if counters[split_block] == pieces:  # the last piece merges, and resets the counter
                slots = [2 * (split_block + i) + (1 if i == 0 else 0) for i in range(pieces)]
                for g in range(num_q):
                    m = max(part_ml[s, g, 0] for s in slots)
                    w = [np.exp2(part_ml[s, g, 0] - m) for s in slots]
                    out[w_seq, head0 + g] = sum(wi * part_out[s, g] for wi, s in zip(w, slots)) / sum(
                        wi * part_ml[s, g, 1] for wi, s in zip(w, slots))
                merged[(split_block, w_seq, w_hg)] = pieces
                counters[split_block] = 0
    return out, merged, counters


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_balanced_plan_emulated(data):
    """The kernel's walk, partial slots and last-piece merges compute attention exactly, whatever order the
    thread blocks run in; the counters end at zero; the host plan lists the same merges."""
    lens = data.draw(st.lists(st.one_of(st.integers(1, 40), st.integers(1, 400)), min_size=1, max_size=7))
    bs = data.draw(st.sampled_from((4, 8, 16)))
    num_kv_heads, group = data.draw(st.sampled_from(((1, 1), (2, 3), (1, 8), (2, 2))))
    gt = decode_plan.group_tile(group) if data.draw(st.booleans()) else 1
    tile_tokens = data.draw(st.sampled_from((4, 16, 24)))
    num_blocks = data.draw(st.integers(1, 40))
    min_tiles = data.draw(st.integers(1, 6))
    order = data.draw(st.permutations(range(num_blocks)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    q, k, v, bt, cl = make_problem(rng, F32, 16, bs, num_kv_heads * group, num_kv_heads, lens)
    got, merged, counters = emulate_v3(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), bt, cl,
                                       tile_tokens, gt, num_blocks, min_tiles, order)
    ref = paged_decode_attention(q, k, v, bt, cl)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    assert not counters.any()
    plan = decode_plan.balanced_plan(cl, num_kv_heads * -(-group // gt), tile_tokens, num_blocks, min_tiles)
    assert {(m.block, m.seq, m.head_group): m.num_pieces for m in plan.merges} == merged
    units = num_kv_heads * -(-group // gt) * sum(-(-int(n) // tile_tokens) for n in cl)
    assert sum(p.num_tiles for p in plan.pieces) == units
    assert all(p.num_tiles <= plan.per_block for p in plan.pieces)


def emulate_partition_plan(q, k, v, block_tables, context_lens, tile_tokens, gt, grid, max_parts, order):
    """The default's partition plan (kernel 3's mode 2) in float64, as the CUDA code runs it: items
    (seq, head group, part) taken from the queue in ``order`` (any order), partials in slot ``item``, the
    partition that finishes last merging. Returns (out, counters after)."""
    batch, num_qo_heads, head_dim = q.shape
    num_kv_heads, block_size = k.shape[1], k.shape[2]
    group = num_qo_heads // num_kv_heads
    q_tiles = -(-group // gt)
    num_hg = num_kv_heads * q_tiles
    _, parts, pt = decode_plan.dispatch(context_lens, num_hg, tile_tokens, grid, max_parts, mode=2)
    assert 1 <= parts <= max_parts and pt % tile_tokens == 0
    out = np.full(q.shape, np.nan)
    part_out = np.full((batch * num_hg * parts, gt, head_dim), np.nan)
    part_ml = np.full((batch * num_hg * parts, gt, 2), np.nan)
    counters = np.zeros(batch * num_hg, dtype=int)
    scale = head_dim**-0.5 * math.log2(math.e)
    items = batch * num_hg * parts
    for item in (order(items) if order else range(items)):
        part, rest = item % parts, item // parts
        hg, seq = rest % num_hg, rest // num_hg
        length, start = int(context_lens[seq]), part * pt
        if start >= length:
            continue
        kv_head, q_tile = divmod(hg, q_tiles)
        head0, num_q = kv_head * group + q_tile * gt, min(gt, group - q_tile * gt)
        n_parts = -(-length // pt)
        t = np.arange(start, min(length, start + pt))
        kk, vv = k[block_tables[seq, t // block_size], kv_head, t % block_size], \
            v[block_tables[seq, t // block_size], kv_head, t % block_size]
        for g in range(num_q):
            sc = kk @ q[seq, head0 + g] * scale
            m = sc.max()
            p = np.exp2(sc - m)
            if n_parts == 1:
                out[seq, head0 + g] = p @ vv / p.sum()
            else:
                part_out[item, g], part_ml[item, g] = p @ vv, (m, p.sum())
        if n_parts == 1:
            continue
        counters[rest] += 1
        if counters[rest] == n_parts:
            slots = [rest * parts + i for i in range(n_parts)]
            for g in range(num_q):
                m = max(part_ml[s, g, 0] for s in slots)
                w = [np.exp2(part_ml[s, g, 0] - m) for s in slots]
                out[seq, head0 + g] = sum(wi * part_out[s, g] for wi, s in zip(w, slots)) / sum(
                    wi * part_ml[s, g, 1] for wi, s in zip(w, slots))
            counters[rest] = 0
    return out, counters


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_partition_plan_emulated(data):
    """The dispatcher's partition plan (partitions from the longest length, queue order arbitrary, the last
    partition merging) computes attention exactly; the merge counters end at zero."""
    lens = data.draw(st.lists(st.one_of(st.integers(1, 40), st.integers(200, 1500)), min_size=1, max_size=6))
    bs = data.draw(st.sampled_from((4, 8, 16)))
    num_kv_heads, group = data.draw(st.sampled_from(((1, 1), (2, 3), (1, 8), (2, 2), (1, 7))))
    gt = decode_plan.group_tile(group)
    tile_tokens = data.draw(st.sampled_from((16, 32)))
    grid = data.draw(st.integers(1, 40))
    max_parts = data.draw(st.integers(1, 8))
    perm = data.draw(st.randoms(use_true_random=False))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    q, k, v, bt, cl = make_problem(rng, F32, 16, bs, num_kv_heads * group, num_kv_heads, lens)
    order = lambda n: perm.sample(range(n), n)  # noqa: E731
    got, counters = emulate_partition_plan(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), bt, cl,
                                           tile_tokens, gt, grid, max_parts, order)
    np.testing.assert_allclose(got, paged_decode_attention(q, k, v, bt, cl), rtol=1e-9, atol=1e-12)
    assert not counters.any()


def test_dispatch_choices():
    """The dispatcher's rule on the benchmark's shapes (H100-like grid of 528 blocks, tile 16, 8 head groups):
    uniform batches take the partition plan with wave-filling partitions, ragged ones the walk."""
    grid, tt, hg = 528, 16, 8
    mp = lambda batch, cap: decode_plan.partition_max_parts(batch * hg, grid, cap)  # noqa: E731
    assert decode_plan.dispatch([32768], hg, tt, grid, mp(1, 32768)) == (2, 63, 528)  # kernel 2 took 63 too
    assert decode_plan.dispatch([8192] * 32, hg, tt, grid, mp(32, 8192)) == (2, 2, 4096)
    assert decode_plan.dispatch([512] * 256, hg, tt, grid, mp(256, 512)) == (2, 1, 512)
    rng = np.random.default_rng(0)
    for lens in (rng.integers(17, 701, 200), rng.integers(1000, 32001, 32), rng.integers(64, 4097, 128),
                 [32768] + rng.integers(16, 513, 127).tolist()):
        assert decode_plan.dispatch(lens, hg, tt, grid, mp(len(lens), int(max(lens))))[0] == 3
    # 32/32 heads (GT 1: 32 head groups), U[256, 8192]: small pieces against a block's share -> partitions
    lens = rng.integers(256, 8193, 64)
    assert decode_plan.dispatch(lens, 32, tt, 660, decode_plan.partition_max_parts(64 * 32, 660, 8192))[0] == 2
    assert decode_plan.dispatch([5, 700], hg, tt, grid, 2, mode=3)[0] == 3


def test_balanced_plan_picture():
    """The header's picture in numbers: a long sequence is cut, short ones stay whole, pieces balance."""
    plan = decode_plan.balanced_plan([5 * 16, 2 * 16, 9 * 16, 3 * 16], 2, 16, 6, 1)
    assert plan.per_block == 7  # 38 units over 6 blocks
    per_block = np.bincount([p.block for p in plan.pieces], weights=[p.num_tiles for p in plan.pieces])
    assert per_block.tolist() == [7, 7, 7, 7, 7, 3]
    # hg 0: s0 [0, 5) s1 [5, 7) s2 [7, 16) s3 [16, 19); hg 1: s0 [19, 24) s1 [24, 26) s2 [26, 35) s3 [35, 38)
    assert [(m.block, m.head_group, m.seq, m.num_pieces) for m in plan.merges] == [(1, 0, 2, 2), (2, 1, 0, 2),
                                                                                   (3, 1, 2, 2)]
    assert [p.slot for p in plan.pieces if p.seq == 2 and p.head_group == 0] == [3, 4]  # 2b + 1, then 2(b + 1)


# ---- helpers --------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _exact_allocations():
    """Under compute-sanitizer, allocate with plain cudaMalloc so out-of-bounds accesses are caught."""
    if SANITIZER:
        import cupy

        cupy.cuda.set_allocator(None)
    yield


def _bf16_native() -> bool:
    return compile.cupy_has_bfloat16()


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
        decode.paged_attention(q, kc, vc, bt, cl, version=version, out=out, kv_dtype="bfloat16", **kw)
    elif kw:
        decode.paged_attention(q, kc, vc, bt, cl, version=version, out=out, **kw)
    else:
        ops.paged_attention(q, kc, vc, bt, cl, version=version, out=out)
    return to_host_f64(out, dtype)


def poison_unused(k, v, block_tables, context_lens) -> None:
    """NaN (in place) in every cache slot that no sequence's first context_lens[i] tokens use."""
    num_blocks, _, block_size, _ = k.shape
    live = np.zeros((num_blocks, block_size), dtype=bool)
    for i, n in enumerate(context_lens):
        t = np.arange(int(n))
        live[block_tables[i, t // block_size], t % block_size] = True
    k.transpose(0, 2, 1, 3)[~live] = np.nan  # [num_blocks, block_size, heads, head_dim] view
    v.transpose(0, 2, 1, 3)[~live] = np.nan


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
    poison_unused(k, v, block_tables, context_lens)
    q = rng.standard_normal((len(context_lens), num_qo_heads, head_dim)).astype(np.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), block_tables, context_lens


def check_attention(rng, dtype, head_dim, block_size, heads, context_lens, variants=(({}, (1, 2, 3)),),
                    share_prefix=0):
    """One fresh problem, every (keyword arguments, versions) variant against its float64 reference."""
    q, k, v, bt, cl = make_problem(rng, dtype, head_dim, block_size, *heads, context_lens, share_prefix=share_prefix)
    ref = paged_decode_attention(q, k, v, bt, cl)
    dq, dk, dv, dbt, dcl = to_dev(q), to_dev(k), to_dev(v), to_dev(bt), to_dev(cl)
    for kw, versions in variants:
        for version in versions:
            got = attention(dq, dk, dv, dbt, dcl, dtype, version, **kw)
            what = f"v{version} {kw} {dtype} hd={head_dim} bs={block_size} {heads}"
            assert np.isfinite(got).all(), f"{what}: unwritten or NaN-contaminated output"
            err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert err <= RTOL[dtype], f"{what}: rel err {err:.3g}"


# ---- GPU: attention -----------------------------------------------------------------------------

def _grid():
    if SANITIZER:
        cases = [(F16, 128, 16, (32, 8)), (BF16, 80, 8, (16, 1)), (F32, 256, 32, (8, 8)), (F16, 96, 16, (32, 4))]
    else:
        new = [(bs, h) for bs, h in zip((8, 16, 32, 16), HEADS)]  # each block size and head layout once
        cases = [(dt, hd, bs, h) for dt in DTYPES for hd in decode.HEAD_DIMS
                 for bs, h in ([(bs, h) for bs in (8, 16, 32) for h in HEADS] if hd in ORIGINAL_HEAD_DIMS else new)]
    return [pytest.param(*c, marks=_group(f"{c[0]}-{c[1]}"), id=f"{c[0]}-hd{c[1]}-bs{c[2]}-{c[3][0]}x{c[3][1]}")
            for c in cases]


@gpu
@pytest.mark.parametrize("dtype,head_dim,block_size,heads", _grid())
def test_attention_grid(dtype, head_dim, block_size, heads):
    rng = np.random.default_rng(zlib.crc32(repr((str(dtype), head_dim, block_size, heads)).encode()))
    long = 300 if SANITIZER else 1000 + int(rng.integers(0, 100))
    # forced split-K (kernel 2: three partitions, some past the end of the short sequences) and forced
    # balanced splits (kernel 3: 7 blocks of any size, so sequences are cut and merged; 1 block walks all)
    check_attention(rng, dtype, head_dim, block_size, heads, [1, block_size, block_size + 1, long], VARIANTS)


def _ragged_lens(rng, block_size, tile_tokens):
    """One long sequence among many short: lengths 1, block and tile boundaries (+-1), random."""
    edges = [1, 2, block_size - 1, block_size, block_size + 1, 2 * block_size, tile_tokens - 1, tile_tokens,
             tile_tokens + 1, 3 * tile_tokens]
    short = rng.integers(1, 200, 20).tolist()
    lens = [n for n in edges if n >= 1] + short + [2000 if SANITIZER else 9000 + int(rng.integers(0, 500))]
    return rng.permutation(lens).tolist()


def _ragged_cases():
    cases = [(F16, 128, 16, (32, 8)), (BF16, 64, 16, (32, 4)), (F32, 80, 8, (16, 1)), (F16, 112, 32, (28, 4))]
    return [pytest.param(*c, marks=_group(f"{c[0]}-{c[1]}"), id=f"{c[0]}-hd{c[1]}-bs{c[2]}-{c[3][0]}x{c[3][1]}")
            for c in cases[:1 if SANITIZER else None]]


@gpu
@pytest.mark.parametrize("dtype,head_dim,block_size,heads", _ragged_cases())
def test_attention_ragged_balanced(dtype, head_dim, block_size, heads):
    """Ragged batches through kernel 3's plan: the default grid and small forced grids (splits, merges)."""
    rng = np.random.default_rng(head_dim * 1000 + block_size)
    tile = decode_plan.tile_shape(compile.dt_code(dtype), head_dim)["tile_tokens"]
    variants = (({}, (2, 3, None)), ({"num_ctas": 3, "min_tiles": 1}, (3,)), ({"num_ctas": 64, "min_tiles": 1}, (3,)),
                ({"num_ctas": 1000, "min_tiles": 1}, (3,)), ({"min_tiles": 40}, (3,)), ({"mode": 2}, (None,)),
                ({"mode": 2, "num_ctas": 5}, (None,)))
    check_attention(rng, dtype, head_dim, block_size, heads, _ragged_lens(rng, block_size, tile), variants)
    check_attention(rng, dtype, head_dim, block_size, heads, [1] * 37, variants)  # all length 1


@gpu
@pytest.mark.parametrize("version", [pytest.param(v, marks=_group(f"{F16}-128")) for v in (2, 3, None)])
def test_attention_cuda_graph_replay(version):
    """Capture ops.paged_attention(..., check=False) once, replay it with new context_lens, block tables,
    q and cache contents (written in place): every replay matches the reference of its own inputs."""
    import cupy

    rng = np.random.default_rng(version)
    heads, bs, hd = (32, 8), 16, 128
    q, k, v, bt, cl = make_problem(rng, F16, hd, bs, *heads, [4000, 3000, 2500, 1, 700, 64] + [300] * 10)
    dq, dk, dv, dbt, dcl = to_dev(q), to_dev(k), to_dev(v), to_dev(bt), to_dev(cl)
    out = poisoned_like(q.shape, F16)
    cupy.cuda.Device().synchronize()  # NOTE: the uploads ran on the default stream; the launches do not
    pool, stream = cupy.cuda.MemoryPool(), cupy.cuda.Stream(non_blocking=True)
    with cupy.cuda.using_allocator(pool.malloc), stream:
        ops.paged_attention(dq, dk, dv, dbt, dcl, version=version, out=out, check=False)  # warm the pool
        stream.synchronize()
        stream.begin_capture()
        ops.paged_attention(dq, dk, dv, dbt, dcl, version=version, out=out, check=False)
        graph = stream.end_capture()
    capacity = bt.shape[1] * bs
    for new_lens in ([1] * 15 + [capacity], [capacity, capacity, 17, 1, 2, 3] + [capacity - 1] * 10,
                     rng.integers(1, capacity + 1, len(cl)).tolist()):
        new_lens = np.asarray(new_lens, dtype=np.int32)
        new_bt = rng.permutation(bt.ravel()).reshape(bt.shape).astype(np.int32)  # same blocks, new owners
        k2 = rng.standard_normal(k.shape).astype(np.float32)
        v2 = rng.standard_normal(v.shape).astype(np.float32)
        poison_unused(k2, v2, new_bt, new_lens)
        q2 = rng.standard_normal(q.shape).astype(np.float16)
        k2, v2 = k2.astype(np.float16), v2.astype(np.float16)
        for dev, host in ((dq, q2), (dk, k2), (dv, v2), (dbt, new_bt), (dcl, new_lens)):
            dev.set(host, stream=stream)
        with stream:
            out.view(np.uint16).fill(NAN_BITS[2])
        graph.launch(stream)
        stream.synchronize()
        got = to_host_f64(out, F16)
        ref = paged_decode_attention(q2, k2, v2, new_bt, new_lens)
        assert np.isfinite(got).all(), f"lens {new_lens.tolist()}: unwritten or NaN-contaminated output"
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= RTOL[F16]


@gpu
@pytest.mark.skipif(SANITIZER, reason="long contexts are skipped under compute-sanitizer")
@pytest.mark.parametrize("dtype,head_dim,block_size,heads", [
    pytest.param(F16, 128, 16, (32, 8), marks=_group(f"{F16}-128")),
    pytest.param(BF16, 128, 16, (32, 8), marks=_group(f"{BF16}-128")),
    pytest.param(F32, 128, 16, (32, 8), marks=_group(f"{F32}-128")),
    pytest.param(F32, 256, 32, (16, 1), marks=_group(f"{F32}-256")),
    pytest.param(F16, 64, 8, (8, 8), marks=_group(f"{F16}-64")),
], ids=str)
def test_attention_context_32768(dtype, head_dim, block_size, heads):
    rng = np.random.default_rng(32768)
    check_attention(rng, dtype, head_dim, block_size, heads, [32768, 5000])


@gpu
@pytest.mark.parametrize("_", [pytest.param(0, marks=_group("hypothesis"))])
@settings(max_examples=5 if SANITIZER else 40, deadline=None)
@given(data=st.data())
def test_attention_hypothesis_tables(_, data):
    dtype = data.draw(st.sampled_from(DTYPES))
    head_dim = 128  # NOTE: one head dim keeps this test's compiles (one module per dtype x GT) to 9
    block_size = data.draw(st.sampled_from((8, 16, 32)))
    num_kv_heads = data.draw(st.sampled_from((1, 2, 4)))
    group = data.draw(st.sampled_from((1, 3, 4, 8, 16)))
    lens = data.draw(st.lists(st.integers(1, 400), min_size=1, max_size=6))
    share = data.draw(st.integers(0, 4))
    num_ctas = data.draw(st.sampled_from((None, 1, 2, 5, 33)))
    seed = data.draw(st.integers(0, 2**32 - 1))
    check_attention(np.random.default_rng(seed), dtype, head_dim, block_size, (num_kv_heads * group, num_kv_heads),
                    lens, (({}, (1, 2, 3)), ({"num_ctas": num_ctas, "min_tiles": 1}, (3,))), share_prefix=share)


@gpu
@pytest.mark.skipif(SANITIZER, reason="an 8.7 GB pool is skipped under compute-sanitizer")
@pytest.mark.parametrize("_", [pytest.param(0, marks=_group(f"{F16}-128"))])
def test_pool_over_2_pow_31_elements(_):
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
    for version in decode.VERSIONS:
        got = attention(cupy.asarray(q), kc, vc, cupy.asarray(bt), cupy.asarray(lens), F16, version)
        assert np.isfinite(got).all()
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= RTOL[F16]
    # write_kv and copy_blocks at the end of the same pool
    last = num_blocks - 1
    new_k = cupy.asarray(rng.standard_normal((2, num_kv_heads, head_dim)).astype(np.float16))
    ops.write_kv(new_k, new_k, kc, vc, cupy.asarray([last * block_size + 3, -1]))
    assert cupy.array_equal(kc[last, :, 3], new_k[0])
    ops.copy_blocks(kc[None], vc[None], cupy.asarray([last]), cupy.asarray([num_blocks - 1000]))
    assert cupy.array_equal(kc[num_blocks - 1000], kc[last]) and cupy.array_equal(vc[num_blocks - 1000], vc[last])


@gpu
@pytest.mark.parametrize("heads", [pytest.param(h, marks=_group(f"{F16}-128")) for h in ((32, 8), (28, 4))], ids=str)
def test_dispatcher_graph_replay_chooses_per_launch(heads):
    """The default (version None) captured once in a CUDA graph, replayed with uniform, then ragged, then
    uniform lengths: every replay chooses on the device as the host mirror does (decode_plan.dispatch: the
    partition plan for the uniform batches, the walk for the ragged one) and matches the reference."""
    import cupy

    rng = np.random.default_rng(16)
    bs, hd, batch, capacity = 16, 128, 24, 2048
    q, k, v, bt, cl = make_problem(rng, F16, hd, bs, *heads, [capacity] * batch)
    dq, dk, dv, dbt, dcl = to_dev(q), to_dev(k), to_dev(v), to_dev(bt), to_dev(cl)
    out = poisoned_like(q.shape, F16)
    cupy.cuda.Device().synchronize()  # NOTE: the uploads ran on the default stream; the launches do not
    pool, stream = cupy.cuda.MemoryPool(), cupy.cuda.Stream(non_blocking=True)
    with cupy.cuda.using_allocator(pool.malloc), stream:
        ops.paged_attention(dq, dk, dv, dbt, dcl, out=out, check=False)
        stream.synchronize()
        stream.begin_capture()
        ops.paged_attention(dq, dk, dv, dbt, dcl, out=out, check=False)
        graph = stream.end_capture()
    plan = decode.v3_launch_plan(q.shape, k.shape, 1, max_blocks=bt.shape[1])
    ragged = rng.integers(1, capacity + 1, batch)
    ragged[0] = capacity
    for new_lens, want in (([capacity] * batch, 2), (ragged.tolist(), 3), ([1000] * batch, 2),
                           ([1000] * (batch - 1) + [900], 2)):
        new_lens = np.asarray(new_lens, dtype=np.int32)
        expect = decode_plan.dispatch(new_lens, plan["q_tiles"] * heads[1], plan["tile_tokens"], plan["ctas"],
                                      plan["max_parts"])
        assert expect[0] == want, (new_lens.tolist(), expect)
        q2 = rng.standard_normal(q.shape).astype(np.float16)
        k2 = rng.standard_normal(k.shape).astype(np.float32)
        v2 = rng.standard_normal(v.shape).astype(np.float32)
        poison_unused(k2, v2, bt, new_lens)
        k2, v2 = k2.astype(np.float16), v2.astype(np.float16)
        for dev, host in ((dq, q2), (dk, k2), (dv, v2), (dcl, new_lens)):
            dev.set(host, stream=stream)
        with stream:
            out.view(np.uint16).fill(NAN_BITS[2])
        graph.launch(stream)
        stream.synchronize()
        got = to_host_f64(out, F16)
        ref = paged_decode_attention(q2, k2, v2, bt, new_lens)
        assert np.isfinite(got).all(), f"lens {new_lens.tolist()}: unwritten or NaN-contaminated output"
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= RTOL[F16]
        choice = decode.last_dispatch(q.shape, k.shape, 1, max_blocks=bt.shape[1])
        assert (choice["mode"], choice["parts"]) == expect[:2], (new_lens.tolist(), choice, expect)
        assert int(plan["counters"][0].get()) == 0 and int(plan["counters"][1].get()) == 0  # the queue reset


# ---- GPU: cache ops -------------------------------------------------------------------------------

def _random_cache(rng, dtype, shape):
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", (*decode.HEAD_DIMS, 72, 3))
def test_write_kv_exact(dtype, head_dim):
    rng = np.random.default_rng(head_dim)
    num_blocks, num_kv_heads, block_size, num_tokens = 20, 4, 16, 37
    kc = _random_cache(rng, dtype, (num_blocks, num_kv_heads, block_size, head_dim))
    vc = _random_cache(rng, dtype, kc.shape)
    k = _random_cache(rng, dtype, (num_tokens, num_kv_heads, head_dim))
    v = _random_cache(rng, dtype, k.shape)
    slots = rng.choice(num_blocks * block_size, num_tokens, replace=False).astype(np.int64)
    slots[::5] = -1
    dk, dv, dkc, dvc = to_dev(k), to_dev(v), to_dev(kc), to_dev(vc)
    if dtype == BF16 and not _bf16_native():
        cache_ops.write_kv(dk, dv, dkc, dvc, to_dev(slots))
    else:
        ops.write_kv(dk, dv, dkc, dvc, to_dev(slots))
    ops.write_kv(k, v, kc, vc, slots)  # host path
    for dev, host in ((dkc, kc), (dvc, vc)):
        np.testing.assert_array_equal(to_host_f64(dev, dtype).view(np.uint64), host.astype(np.float64).view(np.uint64))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 12, 4, 16, 128), (2, 10, 2, 8, 64), (1, 9, 1, 4, 3),
                                   *((2, 7, 2, 8, hd) for hd in (32, 80, 96, 112, 160, 192, 256))])
def test_copy_blocks_exact(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    kp, vp = _random_cache(rng, dtype, shape), _random_cache(rng, dtype, shape)
    ids = rng.permutation(shape[1])
    src, dst = ids[:3], ids[3:6]
    dkp, dvp = to_dev(kp), to_dev(vp)
    if dtype == BF16 and not _bf16_native():
        cache_ops.copy_blocks(dkp, dvp, to_dev(src), to_dev(dst))
    else:
        ops.copy_blocks(dkp, dvp, to_dev(src), to_dev(dst))
    ops.copy_blocks(kp, vp, src, dst)  # host path
    for dev, host in ((dkp, kp), (dvp, vp)):
        np.testing.assert_array_equal(to_host_f64(dev, dtype).view(np.uint64), host.astype(np.float64).view(np.uint64))


# ---- GPU: errors and plumbing ---------------------------------------------------------------------

def _small_problem(head_dim=128, block_size=16):
    rng = np.random.default_rng(0)
    q, k, v, bt, cl = make_problem(rng, F16, head_dim, block_size, 8, 8, [40, 17])
    return [to_dev(x) for x in (q, k, v, bt, cl)]


@gpu
@pytest.mark.parametrize("version", decode.VERSIONS)
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
    q72, k72, v72, bt72, cl72 = make_problem(rng, F16, 72, 16, 8, 8, [20])  # not a multiple of 16
    with pytest.raises(ValueError, match="head_dim"):
        ops.paged_attention(to_dev(q72), to_dev(k72), to_dev(v72), to_dev(bt72), to_dev(cl72), version=version)
    with pytest.raises(ValueError, match="version"):
        ops.paged_attention(q, k, v, bt, cl, version=5)


def test_attention_bad_version_cpu():
    """ops refuses an unknown version before touching anything (host path too)."""
    q = np.zeros((1, 2, 32), np.float32)
    kc = np.zeros((2, 2, 4, 32), np.float32)
    with pytest.raises(ValueError, match="version"):
        ops.paged_attention(q, kc, kc.copy(), np.zeros((1, 1), np.int32), np.ones(1, np.int32), version=0)


@gpu
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


@gpu
def test_check_false_skips_the_check():
    """check=False launches without the range check (the caller vouches for the indices)."""
    q, k, v, bt, cl = _small_problem()
    out = ops.paged_attention(q, k, v, bt, cl, check=False)
    assert out.shape == q.shape


@gpu
def test_compile_error_names_the_file(monkeypatch):
    monkeypatch.setattr(compile, "cu_source", lambda filename: "this is not CUDA;")
    with pytest.raises(compile.KernelCompileError, match=r"paged_attention\.cu"):
        compile.load_module("paged_attention.cu", ("nonexistent_kernel",), (("PAGEDKV_TEST_BROKEN", 1),))


@gpu
def test_torch_tensors_zero_copy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    q, k, v, bt, cl = make_problem(rng, F16, 128, 16, 32, 8, [100, 33])
    ref = paged_decode_attention(q, k, v, bt, cl)
    t = [torch.from_numpy(x).cuda() for x in (q, k, v, bt, cl)]
    out = ops.paged_attention(*t)
    got = to_host_f64(out, F16)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= RTOL[F16]
