"""Decode attention version 4 (tensor cores, kernels_cu/paged_attention_tc.cu) against the float64 reference.

CPU: the launch plan and shared memory, the argument checks, and two NumPy ports of the kernel: its fragment
math (ldmatrix / mma.m16n8k16 as the PTX ISA defines them, fed with the kernel's own lane addresses) and its
control flow (partitions, warps' key slices, masks, online softmax, the warp merge, the partials merged by
whichever partition finishes last).

GPU (``gpu`` mark): head dims 64 / 128 x float16 / bfloat16 q x a cache of q's type, e4m3 or e5m2 x GQA 1, 4, 7,
8 x block sizes 8 / 16 / 32, ragged lengths (1, block and tile boundaries), the plan's split and a forced one,
a 32k sequence, CUDA graph replays with new lengths, bad inputs; fp8 caches through both paths (the converted tile
and the fragments built in registers). Unused cache slots hold NaN (fp8: NaN bytes)
and outputs start as NaN, so a finite result within tolerance proves every row written and nothing unused read.
"""
import math

import numpy as np
import pytest

from pagedkv.kernels import decode, decode_tc
from pagedkv.kernels.reference import paged_decode_attention
from test_decode_fp8 import FORMATS, dequantized, make_fp8_problem
from test_kernels import BF16, F16, NAN_BITS, RTOL, SANITIZER, _bf16_native, make_problem, poisoned_like, to_dev, \
    to_host_f64

gpu = pytest.mark.gpu
GROUPS = (1, 4, 7, 8)
CACHES = ("same", "fp8_e4m3", "fp8_e5m2")


# ---- CPU: plan, shared memory, argument checks --------------------------------------------------------

def test_smem_fits_and_occupancy():
    """Every instantiation fits one block's shared memory (227 KB); on an H100 (228 KB an SM) a 16-bit hd128
    block leaves room for 2 per SM, hd64 for 4, fp8 hd128 2, fp8 hd64 4."""
    sm = 228 * 1024
    want = {(1, 128): 2, (1, 64): 4, (3, 128): 2, (3, 64): 4, (4, 128): 2, (4, 64): 4}
    for (ct, hd), blocks in want.items():
        smem = decode_tc.smem_bytes(ct, hd)
        assert smem <= 227 * 1024
        assert sm // (smem + 1024) == blocks, (ct, hd, smem)
    # the pipeline: 3 stages x (K + V) x 64 keys x 136-element rows + the offset ring
    assert decode_tc.smem_bytes(1, 128) == 3 * 2 * 64 * 136 * 2 + 3 * 64 * 8
    assert decode_tc.smem_bytes(3, 128) == 4 * 2 * 64 * 128 + 4 * 2 * 16 * 136 * 2 + 4 * 64 * 8


def test_smem_of_the_fp8_register_path():
    """The register path has no converted rows and pads each raw row by 16 bytes: 3 blocks an SM at head_dim
    128 (the tile path 2), and at 64 room for 5 (its registers, <= 102, decide)."""
    sm = 228 * 1024
    for ct in decode_tc.FP8_CTS:
        assert decode_tc.smem_bytes(ct, 128, "registers") == 4 * 2 * 64 * 144 + 4 * 64 * 8
        assert decode_tc.smem_bytes(ct, 64, "registers") == 4 * 2 * 64 * 80 + 4 * 64 * 8
        assert sm // (decode_tc.smem_bytes(ct, 128, "registers") + 1024) == 3
        assert sm // (decode_tc.smem_bytes(ct, 64, "registers") + 1024) == 5
        for hd in decode_tc.HEAD_DIMS:
            assert decode_tc.smem_bytes(ct, hd, "registers") < decode_tc.smem_bytes(ct, hd, "tile")


def test_kernel_names_cover_both_fp8_paths():
    names = decode_tc.kernel_names(1, 128)
    assert names == ("paged_attention_tc_kernel<1, 128, 1>", "paged_attention_tc_kernel<1, 128, 3>",
                     "paged_attention_tc_kernel<1, 128, 3, 1>", "paged_attention_tc_kernel<1, 128, 4>",
                     "paged_attention_tc_kernel<1, 128, 4, 1>")


def test_check_fp8_path():
    for ct in decode_tc.FP8_CTS:
        for path in decode_tc.FP8_PATHS:
            decode_tc.check_fp8_path(path, ct)
    decode_tc.check_fp8_path("tile", 1)  # the 16-bit cache's only path
    with pytest.raises(ValueError, match="needs an fp8 cache"):
        decode_tc.check_fp8_path("registers", 1)
    with pytest.raises(ValueError, match="fp8_path must be one of"):
        decode_tc.check_fp8_path("shared", 3)


def test_resolve_fp8_path(monkeypatch):
    """No path named: an fp8 cache takes decode_tc.FP8_PATH (what decode.paged_attention and the engine's
    choose_version plan with), a 16-bit cache the tile; a named path is checked."""
    assert decode_tc.FP8_PATH in decode_tc.FP8_PATHS
    for ct in decode_tc.FP8_CTS:
        assert decode_tc.resolve_fp8_path(None, ct) == decode_tc.FP8_PATH
        assert decode_tc.resolve_fp8_path("registers", ct) == "registers"
    monkeypatch.setattr(decode_tc, "FP8_PATH", "registers")
    assert decode_tc.resolve_fp8_path(None, 3) == "registers"
    assert decode_tc.resolve_fp8_path(None, 1) == "tile"  # the 16-bit cache's only path
    with pytest.raises(ValueError, match="needs an fp8 cache"):
        decode_tc.resolve_fp8_path("registers", 2)


def test_partition_plan_on_benchmark_shapes():
    """Kernel 2's wave-filling rule over (KV head, sequence) blocks, 264 resident (an H100 at 2 per SM)."""
    res = 264
    assert decode_tc.partition_plan(1, 8, 32768, res) == (32, 1024)  # 256 blocks of 16 tiles
    assert decode_tc.partition_plan(32, 8, 8192, res) == (1, 8192)
    assert decode_tc.partition_plan(64, 8, 2048, res) == (1, 2048)
    parts, pt = decode_tc.partition_plan(12, 4, 2048, res)  # Qwen2.5-7B shape, capacity 2048
    assert parts * 48 <= res and pt % decode_tc.BLOCK_N == 0 and parts * pt >= 2048
    for cap in (1, 64, 65, 1000, 32768):
        for n in (1, 2, 3, 7, 100):
            parts, pt = decode_tc.partition_plan(2, 2, cap, res, n)
            assert pt % decode_tc.BLOCK_N == 0 and parts * pt >= cap and (parts - 1) * pt < cap and parts <= n
    with pytest.raises(ValueError, match="num_partitions"):
        decode_tc.partition_plan(1, 1, 64, res, 0)


@pytest.mark.parametrize("args,match", [
    ((0, 0, 128, 32, 8), "float32"),
    ((1, 2, 128, 32, 8), "cache type code 2"),
    ((1, 1, 80, 32, 8), "head_dim=80"),
    ((1, 3, 256, 32, 8), "head_dim=256"),
    ((2, 4, 128, 32, 2), "= 16"),
])
def test_check_args(args, match):
    with pytest.raises(ValueError, match=match):
        decode_tc.check_args(*args)


def test_check_args_accepts():
    for dt in (1, 2):
        for ct in (dt, 3, 4):
            for hd in (64, 128):
                for g in GROUPS:
                    decode_tc.check_args(dt, ct, hd, 4 * g, 4)


# ---- CPU: the fragment math, emulated as the PTX ISA defines the instructions ---------------------------

def ldsm_x4(smem, lane_addr, trans=False):
    """ldmatrix.x4 (.trans): lanes 8i..8i+7 give the row addresses (elements) of matrix i; returns r[lane][i]
    as the pair (low, high) each lane receives."""
    mats = [np.stack([smem[lane_addr[8 * i + r]:lane_addr[8 * i + r] + 8] for r in range(8)]) for i in range(4)]
    out = np.zeros((32, 4, 2))
    for lane in range(32):
        for i, m in enumerate(mats):
            row, col = lane // 4, 2 * (lane % 4)
            out[lane, i] = (m[col, row], m[col + 1, row]) if trans else (m[row, col], m[row, col + 1])
    return out


def mma_16816(d, a, b0, b1):
    """d[lane][4] += A B per mma.m16n8k16 .row.col: a[lane][4][2], b0 / b1[lane][2]."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        A[g, 2 * t:2 * t + 2], A[g + 8, 2 * t:2 * t + 2] = a[lane][0], a[lane][1]
        A[g, 2 * t + 8:2 * t + 10], A[g + 8, 2 * t + 8:2 * t + 10] = a[lane][2], a[lane][3]
        B[2 * t:2 * t + 2, g], B[2 * t + 8:2 * t + 10, g] = b0[lane], b1[lane]
    D = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        d[lane] += [D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]]


@pytest.mark.parametrize("head_dim", decode_tc.HEAD_DIMS)
@pytest.mark.parametrize("group", GROUPS)
def test_fragments_emulated(head_dim, group):
    """One warp's 16 keys as the kernel computes them: q fragments loaded per lane, K through ldmatrix at
    k_lane, S accumulators, P re-packed as A, V through ldmatrix.trans at v_lane: S = Q K^T and O = P V."""
    rng = np.random.default_rng(group * head_dim)
    row = head_dim + 8
    q = rng.standard_normal((group, head_dim))
    kt, vt = rng.standard_normal((16, head_dim)), rng.standard_normal((16, head_dim))
    smem_k, smem_v = np.zeros(16 * row), np.zeros(16 * row)
    for r in range(16):
        smem_k[r * row:r * row + head_dim], smem_v[r * row:r * row + head_dim] = kt[r], vt[r]
    lanes = np.arange(32)
    k_lane = ((((lanes >> 4) & 1) * 8 + (lanes & 7)) * row + ((lanes >> 3) & 1) * 8)  # elements (kernel: bytes)
    v_lane = ((((lanes >> 3) & 1) * 8 + (lanes & 7)) * row + ((lanes >> 4) & 1) * 8)
    s = np.zeros((2, 32, 4))
    for ks in range(head_dim // 16):
        a = np.zeros((32, 4, 2))
        for lane in range(32):
            g, t = lane // 4, lane % 4
            if g < group:  # q_frag[ks][0] = Q[g][16ks + 2t, +1], q_frag[ks][1] = Q[g][16ks + 8 + 2t, +1]
                a[lane, 0] = q[g, 16 * ks + 2 * t:16 * ks + 2 * t + 2]
                a[lane, 2] = q[g, 16 * ks + 8 + 2 * t:16 * ks + 8 + 2 * t + 2]
        b = ldsm_x4(smem_k, k_lane + ks * 16)
        mma_16816(s[0], a, b[:, 0], b[:, 1])
        mma_16816(s[1], a, b[:, 2], b[:, 3])
    want = q @ kt.T  # [group, 16]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        if g < group:
            for j in range(2):
                np.testing.assert_allclose(s[j, lane, :2], want[g, 8 * j + 2 * t:8 * j + 2 * t + 2], rtol=1e-12)
        assert not s[:, lane, 2:].any()  # rows g + 8: zero padding
    p = rng.random((2, 32, 4))  # any P in the accumulator layout
    a = np.zeros((32, 4, 2))
    a[:, 0], a[:, 2] = p[0, :, :2], p[1, :, :2]
    o = np.zeros((head_dim // 8, 32, 4))
    for dp in range(head_dim // 16):
        b = ldsm_x4(smem_v, v_lane + dp * 16, trans=True)
        mma_16816(o[2 * dp], a, b[:, 0], b[:, 1])
        mma_16816(o[2 * dp + 1], a, b[:, 2], b[:, 3])
    pm = np.zeros((8, 16))  # P[g][key]: s[j][lane][e] = S[g][8j + 2t + e]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(2):
            pm[g, 8 * j + 2 * t:8 * j + 2 * t + 2] = p[j, lane, :2]
    want = pm @ vt
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(head_dim // 8):
            np.testing.assert_allclose(o[j, lane, :2], want[g, 8 * j + 2 * t:8 * j + 2 * t + 2], rtol=1e-12)


@pytest.mark.parametrize("head_dim", decode_tc.HEAD_DIMS)
@pytest.mark.parametrize("group", GROUPS)
def test_register_fragments_emulated(head_dim, group):
    """The fp8 register path's fragments (FRAG 1), values standing for the converted bytes: q loaded with the
    permuted head dimension, K words of keys g and 8 + g at bytes KB t.., S accumulators; V words of keys 2t, 2t + 1,
    2t + 8, 2t + 9 at bytes VB g.., byte j of two rows one B register of n8 tile j; then the O rows as the kernel
    stages them (dimension VB (2t + e) + j): S = Q K^T and O = P V in the natural order."""
    rng = np.random.default_rng(7 * group + head_dim)
    kb, vb = head_dim // 4, head_dim // 8  # Tc::KB, Tc::VB
    q = rng.standard_normal((group, head_dim))
    kt, vt = rng.standard_normal((16, head_dim)), rng.standard_normal((16, head_dim))
    s = np.zeros((2, 32, 4))
    for ks in range(head_dim // 16):
        a = np.zeros((32, 4, 2))
        b = np.zeros((2, 2, 32, 2))  # [key half j][b0, b1][lane]
        for lane in range(32):
            g, t = lane // 4, lane % 4
            if g < group:  # one 8-byte load: Q[g][t KB + 4ks .. + 3]
                w = q[g, kb * t + 4 * ks:kb * t + 4 * ks + 4]
                a[lane, 0], a[lane, 2] = w[:2], w[2:]
            for j in range(2):  # kw[j][ks]: 4 bytes of key 8j + g at KB t + 4ks, fp8x4_to_16 -> b0, b1
                w = kt[8 * j + g, kb * t + 4 * ks:kb * t + 4 * ks + 4]
                b[j, 0, lane], b[j, 1, lane] = w[:2], w[2:]
        for j in range(2):
            mma_16816(s[j], a, b[j, 0], b[j, 1])
    want = q @ kt.T
    for lane in range(32):
        g, t = lane // 4, lane % 4
        if g < group:
            for j in range(2):
                np.testing.assert_allclose(s[j, lane, :2], want[g, 8 * j + 2 * t:8 * j + 2 * t + 2], rtol=1e-12)
        assert not s[:, lane, 2:].any()
    p = rng.random((2, 32, 4))
    a = np.zeros((32, 4, 2))
    a[:, 0], a[:, 2] = p[0, :, :2], p[1, :, :2]
    o = np.zeros((head_dim // 8, 32, 4))
    for j in range(head_dim // 8):
        b0, b1 = np.zeros((32, 2)), np.zeros((32, 2))
        for lane in range(32):
            g, t = lane // 4, lane % 4
            rows = [2 * t + (r & 1) + 8 * (r >> 1) for r in range(4)]  # vw[r]: bytes VB g .. of key rows[r]
            vw = [vt[r, vb * g:vb * g + vb] for r in rows]
            b0[lane] = vw[0][j], vw[1][j]  # fp8pair_to_16(vw[0][j / 4], vw[1][j / 4], j % 4)
            b1[lane] = vw[2][j], vw[3][j]
        mma_16816(o[j], a, b0, b1)
    staged = np.full((8, head_dim), np.nan)  # the s_o rows of this warp: float4 stores of 4 n8 tiles
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for e in range(2):
            for i in range(head_dim // 32):
                staged[g, vb * (2 * t + e) + 4 * i:vb * (2 * t + e) + 4 * i + 4] = o[4 * i:4 * i + 4, lane, e]
    pm = np.zeros((8, 16))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(2):
            pm[g, 8 * j + 2 * t:8 * j + 2 * t + 2] = p[j, lane, :2]
    np.testing.assert_allclose(staged[:group], (pm @ vt)[:group], rtol=1e-12)
    assert not np.isnan(staged).any()  # every dimension of every row staged once (padding rows too)


def test_register_path_lane_bytes_tile_the_rows():
    """Every byte of a warp's 16 K rows and 16 V rows is read by exactly one lane, with 16-byte (K; V at 128)
    or 8-byte (V at 64) loads at aligned offsets of the padded row (ROW8 = HEAD_DIM + 16)."""
    for head_dim in decode_tc.HEAD_DIMS:
        kb, vb, row8 = head_dim // 4, head_dim // 8, head_dim + 16
        k_hits, v_hits = np.zeros((16, head_dim), int), np.zeros((16, head_dim), int)
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for j in range(2):
                for ch in range(kb // 16):
                    off = kb * t + 16 * ch
                    assert ((8 * j + g) * row8 + off) % 16 == 0
                    k_hits[8 * j + g, off:off + 16] += 1
            for r in range(4):
                key = 2 * t + (r & 1) + 8 * (r >> 1)
                assert (key * row8 + vb * g) % vb == 0
                v_hits[key, vb * g:vb * g + vb] += 1
        assert (k_hits == 1).all() and (v_hits == 1).all(), head_dim


def combine_ml(m, l, m2, l2):
    mx = max(m, m2)
    return mx, l * (1.0 if m == mx else 2.0 ** (m - mx)) + l2 * (1.0 if m2 == mx else 2.0 ** (m2 - mx))


def emulate_v4(q, k, v, block_tables, context_lens, split_tokens, num_parts, order):
    """The kernel's control flow in float64: blocks (part, kv head, seq) in ``order``; per block tiles of 64 keys,
    warp w keys 16w..16w+15, the kernel's online softmax (log2 units), warp merge, partials, last-partition
    merge. ``split_tokens`` as the kernel's argument (0: the length split). Returns (out, counters after)."""
    batch, num_qo_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k.shape
    group = num_qo_heads // num_kv_heads
    c = head_dim**-0.5 * math.log2(math.e)
    out = np.full(q.shape, np.nan)
    # partial rows of MAX_GROUP heads per slot, as the kernel (split_merge.cuh's layout); rows >= group stay NaN
    part_out = np.full((batch * num_kv_heads * num_parts, decode_tc.MAX_GROUP, head_dim), np.nan)
    part_ml = np.full((batch * num_kv_heads * num_parts, decode_tc.MAX_GROUP, 2), np.nan)
    counters = np.zeros(batch * num_kv_heads, dtype=int)
    for part, kvh, seq in order:
        length = int(context_lens[seq])
        part_tokens = split_tokens or max(1, -(-length // (num_parts * 64))) * 64  # the kernel's two splits
        start = part * part_tokens
        if start >= length:
            continue
        end, live = min(length, start + part_tokens), -(-length // part_tokens)
        qs = q[seq, kvh * group:(kvh + 1) * group]
        warps = [(np.full(group, -np.inf), np.zeros(group), np.zeros((group, head_dim))) for _ in range(4)]
        for n in range(-(-(end - start) // 64)):
            for w in range(4):
                key0 = start + n * 64 + 16 * w
                if key0 >= end:
                    continue
                keys = np.arange(key0, key0 + 16)
                valid = keys < end
                kk = np.where(valid[:, None], k[block_tables[seq, np.minimum(keys, end - 1) // block_size], kvh,
                                                np.minimum(keys, end - 1) % block_size], 0.0)
                vv = np.where(valid[:, None], v[block_tables[seq, np.minimum(keys, end - 1) // block_size], kvh,
                                                np.minimum(keys, end - 1) % block_size], 0.0)
                s = np.where(valid[None, :], qs @ kk.T, -np.inf)
                m_run, l_run, o = warps[w]
                m_new = np.maximum(m_run, s.max(axis=1))  # finite: key0 is a real key
                alpha = np.where(m_new == m_run, 1.0, np.exp2(m_run * c - m_new * c))
                p = np.exp2(s * c - m_new[:, None] * c)
                warps[w] = (m_new, l_run * alpha + p.sum(axis=1), o * alpha[:, None] + p @ vv)
        slot = (seq * num_kv_heads + kvh) * num_parts + part
        for h in range(group):
            m, l = -math.inf, 0.0
            for m_run, l_run, _ in warps:  # a warp without keys: (-inf, 0), weight 0
                m, l = combine_ml(m, l, m_run[h] * c, l_run[h])
            acc = sum((1.0 if mr[h] * c == m else 2.0 ** (mr[h] * c - m)) * o[h] for mr, _, o in warps)
            if live == 1:
                out[seq, kvh * group + h] = acc / l
            else:
                part_out[slot, h], part_ml[slot, h] = acc, (m, l)
        if live == 1:
            continue
        rest = seq * num_kv_heads + kvh
        counters[rest] += 1
        if counters[rest] == live:
            counters[rest] = 0
            slots = [rest * num_parts + p for p in range(live)]
            for h in range(group):
                m, l = -math.inf, 0.0
                for s_ in slots:
                    m, l = combine_ml(m, l, *part_ml[s_, h])
                out[seq, kvh * group + h] = sum(2.0 ** (part_ml[s_, h, 0] - m) * part_out[s_, h] for s_ in slots) / l
    return out, counters


@pytest.mark.parametrize("seed", range(6))
def test_control_flow_emulated(seed):
    """Any block order, forced partitions (merges), ragged lengths around tile and warp-slice boundaries:
    the kernel's walk and merges compute attention; the counters end at zero."""
    rng = np.random.default_rng(seed)
    group, num_kv_heads, bs = int(rng.choice(GROUPS)), int(rng.integers(1, 3)), int(rng.choice((8, 16, 32)))
    lens = rng.permutation([1, 15, 16, 17, 63, 64, 65, 200] + rng.integers(1, 400, 3).tolist())
    q, k, v, bt, cl = make_problem(rng, np.float32, 16, bs, num_kv_heads * group, num_kv_heads, lens)
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    for n_parts in (1, 3, 7):
        num_parts, pt = decode_tc.partition_plan(len(cl), num_kv_heads, bt.shape[1] * bs, 100, n_parts)
        blocks = [(p, h, s) for p in range(num_parts) for h in range(num_kv_heads) for s in range(len(cl))]
        for split_tokens in (pt, 0):  # the capacity split, the length split
            order = [blocks[i] for i in rng.permutation(len(blocks))]
            got, counters = emulate_v4(q, k, v, bt, cl, split_tokens, num_parts, order)
            np.testing.assert_allclose(got, paged_decode_attention(q, k, v, bt, cl), rtol=1e-9, atol=1e-12)
            assert not counters.any()


def test_length_split_pieces():
    """The length split's pieces (the kernel's arithmetic, mirrored by decode_tc.tc_longest_piece): whole tiles,
    every sequence in at most num_parts live partitions, the longest piece ceil(len / parts) rounded up."""
    from pagedkv.kernels.decode_tc import tc_longest_piece

    for length in (1, 63, 64, 65, 700, 2048, 30141, 32768):
        for parts in (1, 2, 5, 32):
            piece = tc_longest_piece(length, parts)
            assert piece % decode_tc.BLOCK_N == 0 and piece >= -(-length // parts)
            assert -(-length // piece) <= parts and piece - -(-length // parts) < decode_tc.BLOCK_N


# ---- GPU -----------------------------------------------------------------------------------------------

def _problem(rng, q_dtype, cache, head_dim, block_size, heads, lens, k_scale=0.05, v_scale=0.3):
    """(device q, k, v, bt, cl, launch kwargs, float64 reference) for a 16-bit or fp8 cache."""
    if cache == "same":
        q, k, v, bt, cl = make_problem(rng, q_dtype, head_dim, block_size, *heads, lens)
        ref = paged_decode_attention(q, k, v, bt, cl)
        kw = {"kv_dtype": "bfloat16"} if q_dtype == BF16 and not _bf16_native() else {}
    else:
        q, k, v, bt, cl = make_fp8_problem(rng, q_dtype, head_dim, block_size, *heads, lens, cache, k_scale, v_scale)
        ref = paged_decode_attention(q, dequantized(k, cache, k_scale), dequantized(v, cache, v_scale), bt, cl)
        kw = {"kv_dtype": cache, "k_scale": k_scale, "v_scale": v_scale}
    return (to_dev(q), to_dev(k), to_dev(v), to_dev(bt), to_dev(cl)), kw, ref


def _run(dev, kw, q_dtype, **extra):
    out = poisoned_like(dev[0].shape, q_dtype)
    decode.paged_attention(*dev, version=4, out=out, **kw, **extra)
    return to_host_f64(out, q_dtype)


def _assert_close(got, ref, q_dtype, what):
    assert np.isfinite(got).all(), f"{what}: unwritten or NaN-contaminated output"
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err <= RTOL[q_dtype], f"{what}: rel err {err:.3g}"


def _grid_cases():
    if SANITIZER:
        return [(F16, "same", 128, 16, 4), (F16, "fp8_e4m3", 128, 16, 4)]
    cases = []
    for hd in decode_tc.HEAD_DIMS:
        for qd in (F16, BF16):
            for cache in CACHES:
                for i, group in enumerate(GROUPS):
                    for bs in (8, 16, 32):
                        cases.append((qd, cache, hd, bs, group))
    return cases


@gpu
@pytest.mark.parametrize("q_dtype,cache,head_dim,block_size,group", _grid_cases(),
                         ids=lambda x: str(x) if not isinstance(x, np.dtype) else x.name)
def test_tc_attention_grid(q_dtype, cache, head_dim, block_size, group):
    rng = np.random.default_rng(head_dim * 1000 + block_size * 10 + group)
    heads = (2 * group, 2)
    long = 300 if SANITIZER else 1100 + int(rng.integers(0, 100))
    lens = [1, 2, block_size - 1, block_size, block_size + 1, 15, 16, 17, 63, 64, 65, 127, 128, 129, long]
    lens = rng.permutation(lens + rng.integers(1, 300, 4).tolist()).tolist()
    dev, kw, ref = _problem(rng, q_dtype, cache, head_dim, block_size, heads, lens)
    paths = decode_tc.FP8_PATHS if cache != "same" else ("tile",)
    for path in paths:
        for extra in ({}, {"num_partitions": 3}, {"num_partitions": 40},  # the plan, forced merges (many pieces)
                      {"num_partitions": 3, "split": "length"}, {"split": "length"}):  # ... cut by each length
            _assert_close(_run(dev, kw, q_dtype, fp8_path=path, **extra), ref, q_dtype,
                          f"{cache} {path} q {q_dtype} hd={head_dim} bs={block_size} group={group} {extra}")
    dev, kw, ref = _problem(rng, q_dtype, cache, head_dim, block_size, heads, [700] * 5)  # uniform
    for path in paths:
        _assert_close(_run(dev, kw, q_dtype, num_partitions=2, fp8_path=path), ref, q_dtype, f"{cache} {path} uniform")


@gpu
@pytest.mark.skipif(SANITIZER, reason="long contexts are skipped under compute-sanitizer")
@pytest.mark.parametrize("cache", CACHES)
def test_tc_long_context(cache):
    """One 32k sequence (the plan splits it into many partitions merged in-kernel), and beside a short one."""
    rng = np.random.default_rng(32768)
    for lens in ([32768], [32768, 5000]):
        dev, kw, ref = _problem(rng, F16, cache, 128, 16, (32, 8), lens)
        ct = 1 if cache == "same" else decode.FP8_KV_DTYPES[cache]
        for path in decode_tc.FP8_PATHS if cache != "same" else ("tile",):
            plan = decode_tc.launch_plan(dev[0].shape, dev[1].shape, dev[3].shape[1], 1, ct, fp8_path=path)
            assert plan["parts"] > 1
            _assert_close(_run(dev, kw, F16, fp8_path=path), ref, F16, f"{cache} {path} {lens}")


@gpu
@pytest.mark.parametrize("cache,fp8_path", [("same", "tile"), ("fp8_e4m3", "tile"), ("fp8_e4m3", "registers")])
def test_tc_graph_replay(cache, fp8_path):
    """Captured once (check=False), replayed with new context_lens (and a split plan): correct every time,
    counters back at zero."""
    import cupy

    rng = np.random.default_rng(44)
    dev, kw, _ = _problem(rng, F16, cache, 128, 16, (28, 4), [2048] * 12)
    host = [cupy.asnumpy(x) for x in dev]
    out = poisoned_like(dev[0].shape, F16)
    cupy.cuda.Device().synchronize()  # NOTE: the uploads ran on the default stream; the launches do not
    args = dict(version=4, out=out, check=False, num_partitions=4, fp8_path=fp8_path, **kw)
    pool, stream = cupy.cuda.MemoryPool(), cupy.cuda.Stream(non_blocking=True)
    with cupy.cuda.using_allocator(pool.malloc), stream:
        decode.paged_attention(*dev, **args)  # compiles, opts in to shared memory, allocates the counters
        stream.synchronize()
        stream.begin_capture()
        decode.paged_attention(*dev, **args)
        graph = stream.end_capture()
    for lens in ([2048] * 12, rng.integers(1, 2049, 12).tolist(), [1] * 11 + [2048], [1] * 12):
        lens = np.asarray(lens, dtype=np.int32)
        dev[4].set(lens, stream=stream)
        with stream:
            out.view(np.uint16).fill(NAN_BITS[2])
        graph.launch(stream)
        stream.synchronize()
        q, k, v, bt = host[:4]
        if cache == "same":
            ref = paged_decode_attention(q, k, v, bt, lens)
        else:
            ref = paged_decode_attention(q, dequantized(k, cache, kw["k_scale"]), dequantized(v, cache, kw["v_scale"]),
                                         bt, lens)
        _assert_close(to_host_f64(out, F16), ref, F16, f"replay {lens.tolist()}")
    assert not decode_tc.merge_counters(12 * 4, cupy.cuda.Device().id).any()


@gpu
def test_tc_errors():
    import cupy

    rng = np.random.default_rng(5)
    for hd in (80, 256):
        q, k, v, bt, cl = make_problem(rng, F16, hd, 16, 8, 2, [40, 17])
        with pytest.raises(ValueError, match=f"head_dim={hd}"):
            decode.paged_attention(to_dev(q), to_dev(k), to_dev(v), to_dev(bt), to_dev(cl), version=4)
    q, k, v, bt, cl = make_problem(rng, np.float32, 128, 16, 8, 2, [40, 17])
    with pytest.raises(ValueError, match="float32"):
        decode.paged_attention(*(cupy.asarray(x) for x in (q, k, v, bt, cl)), version=4)
    q, k, v, bt, cl = make_problem(rng, F16, 128, 16, 32, 2, [40, 17])  # 16 query heads per KV head
    dev = [to_dev(x) for x in (q, k, v, bt, cl)]
    with pytest.raises(ValueError, match="= 16"):
        decode.paged_attention(*dev, version=4)
    q, k, v, bt, cl = make_problem(rng, F16, 128, 16, 8, 2, [40, 17])
    dev = [to_dev(x) for x in (q, k, v, bt, cl)]
    with pytest.raises(ValueError, match="mode"):
        decode.paged_attention(*dev, version=4, mode=2)
    with pytest.raises(ValueError, match="group_tile"):
        decode.paged_attention(*dev, version=4, group_tile=4)
    with pytest.raises(ValueError, match="num_partitions"):
        decode.paged_attention(*dev, version=4, num_partitions=0)
    with pytest.raises(ValueError, match="split"):
        decode.paged_attention(*dev, version=4, split="halves")
    with pytest.raises(ValueError, match="split"):
        decode.paged_attention(*dev, version=3, split="length")  # version 4's argument only
    with pytest.raises(ValueError, match="needs an fp8 cache"):
        decode.paged_attention(*dev, version=4, fp8_path="registers")  # a float16 cache
    with pytest.raises(ValueError, match="fp8_path is an option of version 4"):
        decode.paged_attention(*dev, version=3, fp8_path="tile")
    bad = cupy.asarray(cl).copy()
    bad[1] = 10**6
    with pytest.raises(ValueError, match="context_lens"):
        decode.paged_attention(*dev[:4], bad, version=4)
    q8, k8, v8, bt8, cl8 = make_fp8_problem(rng, F16, 128, 16, 8, 2, [40, 17], "fp8_e4m3", 0.1, 0.1)
    with pytest.raises(ValueError, match="k_scale"):
        decode.paged_attention(*(cupy.asarray(x) for x in (q8, k8, v8, bt8, cl8)), version=4, kv_dtype="fp8_e4m3",
                               k_scale=math.nan)
    assert set(FORMATS) == {"fp8_e4m3", "fp8_e5m2"}
