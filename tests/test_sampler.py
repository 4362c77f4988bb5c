"""pagedkv.engine.runner.sampler: the distribution it samples, its filters at their edges, per-seed reproducibility,
log-probabilities, the parameter tensors; on a GPU (marked ``gpu``) the kernel against the NumPy path.

The float64 reference below is the definition written independently of the sampler: softmax(x / T), then
min-p, top-k and top-p (renormalised) as value thresholds that keep whole ties.
"""
import re
import shutil
import subprocess

import ml_dtypes
import numpy as np
import pytest

from pagedkv.kernels import compile
from pagedkv.engine.runner.sampler import (ROW_BYTES, SamplingTensors, branch_seed, gumbel_noise, kept_mask, logprobs,
                                    philox4x32_10, sample)
from pagedkv.sampling_params import SamplingParams

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BF16)


def exact_probs(x, temperature, top_k=-1, top_p=1.0, min_p=0.0) -> np.ndarray:
    """float64 [V]: the filtered, renormalised softmax the sampler draws from."""
    x = np.asarray(x, dtype=np.float64)
    w = np.exp((x - x.max()) / temperature)
    keep = w >= min_p  # p_i / p_max >= min_p
    if 0 < top_k < x.size:
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    if top_p < 1:
        q = np.where(keep, w, 0) / np.where(keep, w, 0).sum()
        above = np.array([q[x > v].sum() for v in x])
        keep &= above < top_p
    p = np.where(keep, w, 0)
    return p / p.sum()


def draw(x, params: SamplingParams, num: int, seed: int = 7) -> np.ndarray:
    """``num`` tokens from one row of logits: one batch row per step 0..num-1."""
    rows = [(params, seed, s) for s in range(num)]
    return sample(np.broadcast_to(np.asarray(x, np.float32), (num, len(x))), SamplingTensors.from_rows(rows))


def assert_matches(tokens, probs):
    counts = np.bincount(tokens, minlength=probs.size)
    assert counts[probs == 0].sum() == 0, f"drew filtered tokens: {np.flatnonzero(counts * (probs == 0))}"
    n, live = tokens.size, probs > 0
    expected = n * probs[live]
    chi2, dof = float(((counts[live] - expected) ** 2 / expected).sum()), int(live.sum()) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * max(dof, 1)) + 10, (chi2, dof, counts, expected)


# ---- the generator ---------------------------------------------------------------------------------------

def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32 10."""
    assert [int(w) for w in philox4x32_10(0, 0, 0, 0, 0, 0)] == [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    assert [int(w) for w in philox4x32_10(*[0xFFFFFFFF] * 6)] == [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
    out = philox4x32_10(0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0)
    assert [int(w) for w in out] == [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]


def test_gumbel_noise_is_gumbel_and_keyed():
    g = gumbel_noise(3, 11, 200_000).astype(np.float64)
    assert g.dtype == np.float64 and np.isfinite(g).all()
    assert abs(g.mean() - 0.5772156649) < 0.01 and abs(g.var() - np.pi**2 / 6) < 0.03
    assert np.array_equal(gumbel_noise(3, 11, 1000), gumbel_noise(3, 11, 5000)[:1000])  # prefix-stable in V
    for seed, step in ((4, 11), (3, 12), (3 + 2**32, 11), (3, 11 + 2**32)):
        assert not np.array_equal(gumbel_noise(seed, step, 1000), gumbel_noise(3, 11, 1000)), (seed, step)


# ---- the distribution ------------------------------------------------------------------------------------

LOGITS = np.array([2.0, 1.5, 1.5, 0.7, 0.0, -0.3, -1.0, -2.5, -4.0, 1.0], dtype=np.float32)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=3),  # the tie at 1.5 sits inside
    SamplingParams(temperature=1.0, min_p=0.2, top_p=0.9),
    SamplingParams(temperature=2.0, top_k=6, top_p=0.95, min_p=0.05),
])
def test_draws_follow_the_filtered_softmax(params):
    probs = exact_probs(LOGITS, params.temperature, params.top_k, params.top_p, params.min_p)
    assert_matches(draw(LOGITS, params, 3000), probs)


def test_greedy_is_argmax_lowest_index_on_ties():
    x = np.array([[0.5, 3.0, 3.0, -1.0], [-np.inf, -2.0, -2.0, -np.inf], [7.0, 7.0, 7.0, 7.0]], np.float32)
    t = SamplingTensors.from_rows([(SamplingParams(temperature=0.0), s, s) for s in range(3)])
    assert sample(x, t).tolist() == [1, 1, 0]


@pytest.mark.parametrize("params,expected", [
    (dict(top_k=2), [0, 1, 2]),  # the 2nd largest is tied: both copies stay
    (dict(top_k=1), [0]),
    (dict(top_k=10), list(range(10))),  # k >= V: off
    (dict(top_k=0), list(range(10))),
    (dict(top_p=1.0), list(range(10))),
    (dict(top_p=1e-6), [0]),
    (dict(min_p=0.0), list(range(10))),
    (dict(min_p=1.0), [0]),
])
def test_filters_at_their_edges(params, expected):
    p = SamplingParams(temperature=1.0, **params)
    assert np.flatnonzero(kept_mask(LOGITS, p.temperature, p.top_k, p.top_p, p.min_p)).tolist() == sorted(expected)


def test_top_p_keeps_a_value_while_the_mass_above_it_is_below_top_p():
    """Exactly at the edge: a value stays iff the (integer) mass strictly above it is < ceil(top_p * S)."""
    x = np.array([1.0, 0.0, -1.0, -1.0, -3.0], np.float32)  # the tie at -1.0 is one group
    q = np.rint(np.exp(x - x.max()) * np.float32(2.0**40)).astype(np.uint64).astype(np.float64)
    s = q.sum()
    for first, group in ((1, [1]), (2, [2, 3]), (4, [4])):
        above = q[:first].sum()
        p_lo = np.float32(above / s)
        p_lo = np.nextafter(p_lo, np.float32(0)) if np.float64(p_lo) * s > above else p_lo
        p_hi = np.nextafter(p_lo, np.float32(1))
        assert np.flatnonzero(kept_mask(x, 1.0, -1, p_lo, 0.0)).tolist() == list(range(first))
        assert np.flatnonzero(kept_mask(x, 1.0, -1, p_hi, 0.0)).tolist() == list(range(first)) + group


def test_top_p_drops_a_value_whose_mass_above_equals_the_target():
    """Masses 2^40 | 2^39 + 2^39 | 0 (exp(-0.6931472) is 0.5 in float32): S = 2^41, top_p 0.5 gives target 2^40,
    exactly the mass above the tie at -0.693, so it goes; one float32 step more and it stays."""
    half = np.float32(-0.6931472)
    x = np.array([0.0, half, half, -200.0], np.float32)
    assert np.exp(np.array([half]))[0] == np.float32(0.5)
    assert np.flatnonzero(kept_mask(x, 1.0, -1, np.float32(0.5), 0.0)).tolist() == [0]
    assert np.flatnonzero(kept_mask(x, 1.0, -1, np.nextafter(np.float32(0.5), np.float32(1)), 0.0)).tolist() == [0, 1, 2]


def test_min_p_is_relative_to_the_most_likely_token():
    x = np.log(np.array([0.5, 0.25, 0.125, 0.1, 0.025], np.float64)).astype(np.float32)  # ratios 1 .5 .25 .2 .05
    assert np.flatnonzero(kept_mask(x, 1.0, -1, 1.0, np.float32(0.22))).tolist() == [0, 1, 2]
    assert np.flatnonzero(kept_mask(x, 1.0, -1, 1.0, np.float32(0.3))).tolist() == [0, 1]
    assert np.flatnonzero(kept_mask(x, 2.0, -1, 1.0, np.float32(0.3))).tolist() == [0, 1, 2, 3]  # ratios ** (1/T)


def test_min_p_then_top_k_then_top_p_over_the_remainder():
    """vLLM's order: top-p renormalises over what min-p and top-k left (0.70 of the top 3 lies above 2.8,
    0.66 of all seven)."""
    x = np.array([3.0, 2.9, 2.8, 0.0, -0.1, -0.2, -0.3], np.float32)
    p = np.float32(0.68)
    assert np.flatnonzero(exact_probs(x, 1.0, top_k=3, top_p=0.68)).tolist() == [0, 1]
    assert np.flatnonzero(kept_mask(x, 1.0, 3, p, 0.0)).tolist() == [0, 1]
    assert np.flatnonzero(kept_mask(x, 1.0, -1, p, np.float32(0.5))).tolist() == [0, 1]
    assert np.flatnonzero(kept_mask(x, 1.0, -1, p, 0.0)).tolist() == [0, 1, 2]


# ---- reproducibility and independence ----------------------------------------------------------------------

def random_rows(rng, num, vocab):
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.8, top_p=0.95), SamplingParams(temperature=1.1, top_k=5),
              SamplingParams(temperature=0.9, min_p=0.1, top_k=20, top_p=0.7)]
    rows = [(params[i % len(params)], int(rng.integers(0, 2**64, dtype=np.uint64)), int(rng.integers(0, 2**40)))
            for i in range(num)]
    return rows, (rng.normal(size=(num, vocab)) * rng.uniform(0.5, 4, size=(num, 1))).astype(np.float32)


def test_a_row_draws_the_same_token_in_any_batch():
    rng = np.random.default_rng(1)
    rows, x = random_rows(rng, 30, 300)
    tokens = sample(x, SamplingTensors.from_rows(rows))
    perm = rng.permutation(30)
    assert np.array_equal(sample(x[perm], SamplingTensors.from_rows([rows[i] for i in perm])), tokens[perm])
    others, y = random_rows(rng, 9, 300)
    mixed = sample(np.concatenate([y[:4], x[7:8], y[4:]]), SamplingTensors.from_rows(others[:4] + [rows[7]] + others[4:]))
    assert mixed[4] == tokens[7]


def test_steps_and_seeds_give_independent_draws():
    """Uniform logits over 4 tokens: (step s, step s+1) and (seed s, seed s+1) pairs fill 16 cells evenly."""
    x = np.zeros(4, np.float32)
    p = SamplingParams(temperature=1.0)
    n = 3000
    steps = sample(np.zeros((n + 1, 4), np.float32), SamplingTensors.from_rows([(p, 5, s) for s in range(n + 1)]))
    seeds = sample(np.zeros((n + 1, 4), np.float32), SamplingTensors.from_rows([(p, s, 9) for s in range(n + 1)]))
    for tokens in (steps, seeds):
        assert_matches(tokens, exact_probs(x, 1.0))
        assert_matches(tokens[:-1] * 4 + tokens[1:], np.full(16, 1 / 16))


def test_branch_seed_uses_the_request_seed_or_the_rng():
    p = SamplingParams(n=2, seed=123)
    rng = np.random.default_rng(0)
    assert branch_seed(p, 1, rng) == p.branch_seed(1) != branch_seed(p, 0, rng)
    a, b = branch_seed(SamplingParams(), 0, rng), branch_seed(SamplingParams(), 0, rng)
    assert a != b and 0 <= a < 2**63


# ---- the tensors and the call's checks ---------------------------------------------------------------------

def test_tensors_are_views_of_one_buffer_and_pad_with_greedy_rows():
    host = SamplingTensors.allocate(4)
    assert host.raw.nbytes == 4 * ROW_BYTES
    host.fill([(SamplingParams(temperature=0.5, top_k=7, top_p=0.9, min_p=0.1), 2**64 - 1, 2**62)])
    assert host.temperature.tolist() == [0.5, 0, 0, 0] and host.top_k.tolist() == [7, 0, 0, 0]
    assert host.top_p.tolist() == [np.float32(0.9), 1, 1, 1] and host.min_p.tolist() == [np.float32(0.1), 0, 0, 0]
    assert host.seed.tolist() == [2**64 - 1, 0, 0, 0] and host.step.tolist() == [2**62, 0, 0, 0]
    other = SamplingTensors.allocate(4)
    host.copy_to(other)
    assert np.array_equal(other.raw, host.raw) and other.seed[0] == 2**64 - 1


@pytest.mark.parametrize("rows,match", [
    ([(SamplingParams(), None, 0)], "seeds"),
    ([(SamplingParams(), -1, 0)], "seeds"),
    ([(SamplingParams(), 2**64, 0)], "seeds"),
    ([(SamplingParams(), 1, -1)], "step"),
    ([(None, 1, 0)], "SamplingParams"),
    ([(SamplingParams(), 1, 0)] * 3, "do not fit"),
])
def test_fill_refuses_bad_rows_before_writing(rows, match):
    host = SamplingTensors.allocate(2)
    host.fill([(SamplingParams(temperature=0.3), 5, 6)])
    before = host.raw.copy()
    with pytest.raises(ValueError, match=match):
        host.fill(rows)
    assert np.array_equal(host.raw, before)


def test_sample_refuses_bad_calls():
    t = SamplingTensors.from_rows([(SamplingParams(), 1, 0)] * 2)
    with pytest.raises(ValueError, match="dtype"):
        sample(np.zeros((2, 8), np.int32), t)
    with pytest.raises(ValueError, match="rows"):
        sample(np.zeros((3, 8), np.float32), t)
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sample(np.zeros(8, np.float32), t)
    with pytest.raises(ValueError, match="out"):
        sample(np.zeros((2, 8), np.float32), t, out=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="same length"):
        SamplingTensors(*(np.zeros(2, np.float32),) * 4, np.zeros(2, np.uint64), np.zeros(2, np.int64))
    out = np.full(2, -1, np.int32)
    assert sample(np.zeros((2, 8), ml_dtypes.bfloat16), t, out=out) is out and (out >= 0).all()


# ---- log-probabilities -------------------------------------------------------------------------------------

def log_softmax64(x):
    x = np.asarray(x, np.float64)
    return x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_match_float64_log_softmax(dtype):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(5, 3000)) * 3).astype(dtype)
    ids = rng.integers(0, 3000, size=5)
    ref = log_softmax64(x.astype(np.float64))
    sampled, top_ids, top_lp = logprobs(x, ids, 4)
    np.testing.assert_allclose(sampled, ref[np.arange(5), ids], rtol=1e-5, atol=1e-5)
    assert top_ids.shape == (5, 4) and top_ids.dtype == np.int32
    best = np.sort(ref, axis=1)[:, ::-1][:, :4]
    np.testing.assert_allclose(top_lp, best, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(ref, top_ids.astype(np.int64), 1), best, rtol=1e-5, atol=1e-5)
    s0, i0, l0 = logprobs(x, ids, 0)
    assert i0.shape == (5, 0) and l0.shape == (5, 0) and np.array_equal(s0, sampled)
    with pytest.raises(ValueError, match="num_top"):
        logprobs(x, ids, 3001)


# ---- a host model of the kernel's selection stages -------------------------------------------------------

def sort_keys(x: np.ndarray) -> tuple[np.ndarray, int]:
    """The kernel's SampleKey: unsigned order of the raw bits (16-bit for float16/bfloat16), -0 as +0."""
    if x.dtype == np.float32:
        b, sign, bits = x.view(np.uint32).astype(np.uint64), 0x80000000, 32
    else:
        b, sign, bits = x.view(np.uint16).astype(np.uint64), 0x8000, 16
    b = np.where(b == sign, 0, b)
    return np.where(b & sign, ~b & (2 * sign - 1), b | sign), bits


def radix_select(keys, bits, weight, target) -> int:
    """The key where the running total of ``weight`` walking down from the largest key first reaches target."""
    prefix, mask, base = 0, 0, 0
    for shift in range(bits - 8, -1, -8):
        sel = (keys & mask) == prefix
        hist = np.zeros(256, np.uint64)
        np.add.at(hist, ((keys[sel] >> shift) & 255).astype(np.int64), weight[sel])
        above = base
        for digit in range(255, -1, -1):
            if above < target <= above + int(hist[digit]):
                break
            above += int(hist[digit])
        prefix, mask, base = prefix | digit << shift, mask | 255 << shift, above
    return prefix


def kernel_model_keep(x_raw, temperature, top_k, top_p, min_p, bound=None) -> np.ndarray:
    """The kept mask as sampling.cu finds it: thread-maximum bounds, radix selects on sort keys, fallback."""
    x = x_raw.astype(np.float32)
    vocab, inv_t = x.size, np.float32(1) / np.float32(temperature)
    keys, bits = sort_keys(x_raw)
    tmax = np.full(1024, -np.inf, np.float32)
    np.maximum.at(tmax, (np.arange(vocab) // 8) % 1024, x)
    tmax = np.sort(tmax)[::-1]
    m, lmp = np.max(x) * inv_t, np.log(np.float32(min_p)) if min_p > 0 else -np.inf
    d, t = x * inv_t - m, -np.inf
    if 0 < top_k < vocab:
        lower = tmax[top_k - 1] if top_k <= 1024 else -np.inf
        sel = x >= lower
        key = radix_select(keys[sel], bits, np.ones(sel.sum(), np.uint64), top_k)
        t = x[sel][np.flatnonzero(keys[sel] == key)[0]]
    in_a = (x >= t) & (d >= lmp)
    if top_p < 1:
        q = np.rint(np.exp(d) * np.float32(2.0**40)).astype(np.uint64)
        target = int(np.ceil(np.float64(q[in_a].sum()) * np.float64(np.float32(top_p))))
        e = np.where((tmax >= t) & (tmax * inv_t - m >= lmp), np.exp(tmax * inv_t - m), 0).astype(np.float32)
        j = np.count_nonzero(np.cumsum(e) < top_p * np.exp(d).sum()) if bound is None else bound
        lower = max(t, tmax[j] if j < 1024 else -np.inf)
        if int(q[in_a & (x >= lower)].sum()) < target:
            lower = t  # the kernel's fallback pass
        sel = in_a & (x >= lower)
        key = radix_select(keys[sel], bits, q[sel], target)
        t = x[sel][np.flatnonzero(keys[sel] == key)[0]]
    return (x >= t) & (d >= lmp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [300, 20_000])
def test_kernel_selection_model_keeps_what_the_reference_keeps(dtype, vocab):
    rng = np.random.default_rng(vocab)
    cases = [(1.0, 50, 1.0, 0.0), (0.7, 1, 1.0, 0.0), (1.0, 2000, 0.9, 0.0), (0.8, -1, 0.95, 0.0),
             (1.2, -1, 0.5, 0.05), (1.0, 40, 0.3, 0.01), (0.5, -1, 0.99, 0.0), (1.0, 7, 1.0, 0.3)]
    for i, (temp, k, p, mp) in enumerate(cases):
        x = (rng.normal(size=vocab) * (0.5 + i)).astype(dtype)  # low-precision dtypes: many ties
        x[rng.integers(vocab, size=3)] = -0.0
        x32 = x.astype(np.float32)
        ref = kept_mask(x32, temp, k, np.float32(p), np.float32(mp))
        for bound in (None, 0):  # 0: the tightest bound, so the fallback pass runs
            got = kernel_model_keep(x, temp, k, np.float32(p), np.float32(mp), bound)
            assert np.array_equal(got, ref), (dtype, vocab, i, bound, np.flatnonzero(got ^ ref)[:10])


# ---- the kernel: compiles without spills (CPU, needs nvcc) ---------------------------------------------------

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sampling_kernel_compiles_without_spills(tmp_path, arch):
    src = tmp_path / "sampling.cu"
    src.write_text(compile.cu_source("sampling.cu"))
    cmd = [NVCC, f"-arch={arch}", "--cubin", "-std=c++17", "-Xptxas", "-v", "-o", str(tmp_path / "s.cubin"), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    entries = re.findall(r"Compiling entry function '(\w+)'", proc.stderr)
    assert set(entries) == {"sample_f32", "sample_f16", "sample_bf16"}
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    assert spills and all(s == ("0", "0") for s in spills), proc.stderr


# ---- GPU: the kernel against the NumPy path ------------------------------------------------------------------

GPU_CASES = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.6),
             SamplingParams(temperature=0.8, top_p=0.95), SamplingParams(temperature=1.0, top_p=0.5),
             SamplingParams(temperature=1.0, top_k=50), SamplingParams(temperature=0.7, top_k=1),
             SamplingParams(temperature=1.0, top_k=2000), SamplingParams(temperature=1.0, min_p=0.05),
             SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02),
             SamplingParams(temperature=1.5, top_k=1500, top_p=0.99)]


def gpu_batch(rng, num, vocab, dtype):
    rows = [(GPU_CASES[i % len(GPU_CASES)], int(rng.integers(0, 2**64, dtype=np.uint64)), int(rng.integers(0, 2**34)))
            for i in range(num)]
    scale = rng.choice([0.5, 1.0, 2.0, 4.0, 8.0], size=(num, 1))
    x = (rng.normal(size=(num, vocab)) * scale).astype(np.float32)
    x[:, rng.integers(vocab, size=4)] += 6  # a few likely tokens, as language models have
    return rows, x.astype(dtype)


def to_dev(a):
    import cupy

    if a.dtype == BF16:
        raw = cupy.asarray(a.view(np.uint16))
        return raw.view(BF16) if compile.cupy_has_bfloat16() else raw
    return cupy.asarray(a)


def gpu_sample(x_dev, rows, dtype, **kw):
    import cupy

    out = cupy.full(len(rows), -7, dtype=cupy.int32)
    bf = dict(logits_dtype="bfloat16") if dtype == BF16 else {}
    sample(x_dev, SamplingTensors.from_rows(rows, cupy), out=out, **bf, **kw)
    return out.get()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [256, 32000, 128256, 151936])
def test_kernel_matches_numpy(dtype, vocab):
    rng = np.random.default_rng(vocab + len(str(dtype)))
    num = 132 if vocab >= 100_000 else 264
    rows, x = gpu_batch(rng, num, vocab, dtype)
    got = gpu_sample(to_dev(x), rows, dtype)
    ref = sample(x, SamplingTensors.from_rows(rows))
    agree = np.mean(got == ref)
    print(f"\nagreement {dtype} V={vocab}: {np.sum(got == ref)}/{num}")
    assert (got >= 0).all() and (got < vocab).all()
    greedy = np.array([r[0].temperature == 0 for r in rows])
    assert np.array_equal(got[greedy], ref[greedy])
    assert agree >= 0.99, [(i, rows[i][0], got[i], ref[i]) for i in np.flatnonzero(got != ref)]
    again = gpu_sample(to_dev(x), rows, dtype)
    assert np.array_equal(again, got)  # deterministic run to run


@pytest.mark.gpu
def test_kernel_fallback_pass_matches_numpy():
    """A build whose top-p bound is always the largest logit: the redo-over-every-token pass decides."""
    import cupy

    from pagedkv.engine.runner import sampler as mod

    rng = np.random.default_rng(5)
    rows, x = gpu_batch(rng, 66, 32000, np.dtype(np.float16))
    kernel = compile.load_function("sampling.cu", "sample_f16", (), (("PAGEDKV_SAMPLE_FORCE_RETRY", 1),))
    t, out = SamplingTensors.from_rows(rows, cupy), cupy.full(66, -1, cupy.int32)
    xd = cupy.asarray(x)
    kernel((66,), (mod.THREADS,), (out, xd, cupy.int64(32000), cupy.int32(32000), cupy.int32(1), t.temperature,
                                   t.top_k, t.top_p, t.min_p, t.seed, t.step, cupy.uint64(0), cupy.uint64(0),
                                   cupy.uint64(0), cupy.int32(0)))  # no processed rows
    ref = sample(x, SamplingTensors.from_rows(rows))
    assert np.mean(out.get() == ref) >= 0.99


@pytest.mark.gpu
def test_kernel_reads_only_its_columns_and_writes_every_row():
    """Rows 1001 + V apart with huge logits between them, unaligned (no 16-byte loads), odd V."""
    import cupy

    rng = np.random.default_rng(6)
    vocab = 5001
    rows, x = gpu_batch(rng, 40, vocab, np.dtype(np.float16))
    wide = cupy.full((40, vocab + 1001), 60000, dtype=cupy.float16)  # read by mistake, it would win
    wide[:, 1:vocab + 1] = cupy.asarray(x)
    got = gpu_sample(wide[:, 1:vocab + 1], rows, np.dtype(np.float16))
    ref = sample(x, SamplingTensors.from_rows(rows))
    assert np.mean(got == ref) >= 0.97 and (got >= 0).all() and (got < vocab).all()


@pytest.mark.gpu
def test_kernel_row_is_independent_of_its_batch():
    import cupy

    rng = np.random.default_rng(7)
    rows, x = gpu_batch(rng, 50, 32000, np.dtype(np.float16))
    xd = cupy.asarray(x)
    tokens = gpu_sample(xd, rows, np.dtype(np.float16))
    perm = rng.permutation(50)
    assert np.array_equal(gpu_sample(xd[perm], [rows[i] for i in perm], np.dtype(np.float16)), tokens[perm])
    assert gpu_sample(xd[7:8], rows[7:8], np.dtype(np.float16))[0] == tokens[7]


@pytest.mark.gpu
def test_captured_graph_replays_with_new_logits_and_params():
    import cupy

    rng = np.random.default_rng(8)
    cap, vocab = 64, 32000
    host, dev = SamplingTensors.allocate(cap), SamplingTensors.allocate(cap, cupy)
    logits, out = cupy.zeros((cap, vocab), cupy.float16), cupy.full(cap, -1, cupy.int32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        sample(logits, dev, out=out)  # compile and warm up outside the capture
        stream.synchronize()
        stream.begin_capture()
        sample(logits, dev, out=out)
        graph = stream.end_capture()
        for n in (64, 17, 64):
            rows, x = gpu_batch(rng, n, vocab, np.dtype(np.float16))
            full = np.zeros((cap, vocab), np.float16)
            full[:n] = x
            host.fill(rows)
            host.copy_to(dev)
            logits.set(full)
            out.fill(-1)
            graph.launch(stream)
            stream.synchronize()
            ref = sample(full, host)
            assert np.mean(out.get() == ref) >= 0.98 and np.array_equal(out.get()[n:], np.zeros(cap - n))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprobs_on_the_device(dtype):
    rng = np.random.default_rng(9)
    x = (rng.normal(size=(6, 151936)) * 4).astype(dtype)
    ids = rng.integers(0, 151936, size=6)
    bf = dict(logits_dtype="bfloat16") if dtype == BF16 and not compile.cupy_has_bfloat16() else {}
    sampled, top_ids, top_lp = (a.get() for a in logprobs(to_dev(x), to_dev(ids), 5, **bf))
    ref = log_softmax64(x.astype(np.float64))
    np.testing.assert_allclose(sampled, ref[np.arange(6), ids], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(top_lp, np.sort(ref, axis=1)[:, ::-1][:, :5], rtol=1e-5, atol=2e-5)

