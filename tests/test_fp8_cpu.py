"""fp8 KV cache on the CPU: the ops' host paths on stored bytes, KVCache byte accounting and scales, the engine end
to end (preemption, prefix caching, copy-on-write, beam search, calibration, checkpoint scales), LLM and the
server flag, and the refusals (unknown names, bad scales, fp8 where it cannot run)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_checkpoint import tiny_folder

from pagedkv import fp8
from pagedkv.kernels import ops, reference
from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams
from pagedkv.beam.search import beam_search
from pagedkv.cache.kv_cache import KVCache
from pagedkv.cache.manager import PagedAttentionManager

GREEDY = SamplingParams(temperature=0, max_tokens=10)


def rand(rng, *shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def fp8_pool(rng, kv_dtype, *shape):
    """Random finite fp8 bytes (NaN / inf codes redrawn as 0)."""
    q = rng.integers(0, 256, size=shape, dtype=np.uint8)
    q[~np.isfinite(q.view(fp8.FP8_NUMPY[kv_dtype]).astype(np.float32))] = 0
    return q


# ------------------------------------------------------------------------------------------------ ops
@pytest.mark.parametrize("kv_dtype", fp8.FP8_DTYPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_write_kv_stores_the_quantized_bytes(kv_dtype, dtype):
    rng = np.random.default_rng(0)
    k, v = rand(rng, 5, 2, 16, dtype=dtype, scale=3), rand(rng, 5, 2, 16, dtype=dtype, scale=300)
    kc, vc = np.full((4, 2, 4, 16), 0x55, np.uint8), np.full((4, 2, 4, 16), 0x55, np.uint8)
    slots = np.array([3, -1, 14, 0, 9])
    ops.write_kv(k, v, kc, vc, slots, kv_dtype=kv_dtype, k_scale=0.5, v_scale=2.0)
    for t, s in enumerate(slots):
        if s >= 0:
            np.testing.assert_array_equal(kc[s // 4, :, s % 4], fp8.quantize(k[t], kv_dtype, 0.5))
            np.testing.assert_array_equal(vc[s // 4, :, s % 4], fp8.quantize(v[t], kv_dtype, 2.0))
    assert (kc[0, :, 1] == 0x55).all()  # an unwritten slot is untouched


def test_copy_blocks_copies_bytes():
    rng = np.random.default_rng(1)
    kp, vp = fp8_pool(rng, "fp8_e4m3", 2, 6, 2, 4, 16), fp8_pool(rng, "fp8_e4m3", 2, 6, 2, 4, 16)
    want_k, want_v = kp.copy(), vp.copy()
    want_k[:, [4, 5]], want_v[:, [4, 5]] = kp[:, [0, 2]], vp[:, [0, 2]]
    ops.copy_blocks(kp, vp, np.array([0, 2]), np.array([4, 5]))
    np.testing.assert_array_equal(kp, want_k)
    np.testing.assert_array_equal(vp, want_v)


@pytest.mark.parametrize("kv_dtype", fp8.FP8_DTYPES)
def test_attention_reads_the_dequantized_bytes(kv_dtype):
    rng = np.random.default_rng(2)
    kc, vc = fp8_pool(rng, kv_dtype, 8, 2, 4, 16), fp8_pool(rng, kv_dtype, 8, 2, 4, 16)
    ks, vs = 0.01, 0.03
    k64 = kc.view(fp8.FP8_NUMPY[kv_dtype]).astype(np.float64) * np.float32(ks)
    v64 = vc.view(fp8.FP8_NUMPY[kv_dtype]).astype(np.float64) * np.float32(vs)
    tables, lens = np.array([[3, 1, 7], [0, 5, 2]]), np.array([11, 6])
    q = rand(rng, 2, 4, 16)
    got = ops.paged_attention(q, kc, vc, tables, lens, kv_dtype=kv_dtype, k_scale=ks, v_scale=vs)
    want = reference.paged_decode_attention(q, k64, v64, tables, lens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    qp = rand(rng, 5, 4, 16)
    starts = np.array([0, 3, 5])
    got = ops.prefill_attention(qp, kc, vc, tables, starts, lens, kv_dtype=kv_dtype, k_scale=ks, v_scale=vs)
    want = reference.prefill_attention(qp, k64, v64, tables, starts, lens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda c, x: ops.write_kv(x, x, c, c.copy(), np.array([0])), "pass kv_dtype"),
    (lambda c, x: ops.write_kv(x, x, c.view(np.float16)[..., :8].copy(), c.view(np.float16)[..., :8].copy(),
                               np.array([0]), kv_dtype="fp8"), "needs uint8 caches"),
    (lambda c, x: ops.write_kv(x, x, c, c.copy(), np.array([0]), kv_dtype="fp8_e3m4"), "kv_dtype must be one of"),
    (lambda c, x: ops.write_kv(x, x, c, c.copy(), np.array([0]), kv_dtype="fp8", k_scale=0.0), "k_scale"),
    (lambda c, x: ops.write_kv(x, x, c, c.copy(), np.array([0]), kv_dtype="fp8", v_scale=math.nan), "v_scale"),
    (lambda c, x: ops.paged_attention(x, c, c.copy(), np.zeros((1, 1), int), np.array([1])), "pass kv_dtype"),
    (lambda c, x: ops.paged_attention(x, c, c.copy(), np.zeros((1, 1), int), np.array([1]), kv_dtype="fp8",
                                      k_scale=-1.0), "k_scale"),
])
def test_bad_fp8_arguments_are_refused_before_any_write(call, match):
    cache = np.zeros((2, 1, 4, 16), np.uint8)
    x = np.ones((1, 1, 16), np.float32)
    before = cache.copy()
    with pytest.raises(ValueError, match=match):
        call(cache, x)
    np.testing.assert_array_equal(cache, before)


# -------------------------------------------------------------------------------------------- KVCache
def test_byte_budget_holds_twice_the_blocks_of_float16():
    shape = dict(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype="float16", device="cpu")
    half = KVCache.from_memory_budget(1 << 20, **shape)
    eight = KVCache.from_memory_budget(1 << 20, kv_dtype="fp8", **shape)
    assert eight.num_blocks == 2 * half.num_blocks and eight.bytes_per_block * 2 == half.bytes_per_block
    assert eight.k_pool.dtype == np.uint8 and eight.k_pool.nbytes + eight.v_pool.nbytes == eight.total_bytes
    assert eight.attention_args(1) == {"kv_dtype": "fp8_e4m3", "k_scale": 1.0, "v_scale": 1.0}
    assert half.attention_args(1) == {} and not half.is_fp8


def test_scales_are_checked_before_they_change():
    cache = KVCache(2, 4, 4, 1, 16, "float32", "cpu", kv_dtype="fp8_e5m2", k_scales=[0.5, 2.0])
    assert cache.attention_args(1)["k_scale"] == 2.0 and cache.attention_args(0)["v_scale"] == 1.0
    with pytest.raises(ValueError, match=r"v_scales\[1\]"):
        cache.set_scales(3.0, [1.0, math.inf])
    np.testing.assert_array_equal(cache.k_scales, [0.5, 2.0])  # unchanged
    for bad in (0, -1.0, math.nan, [1.0]):
        with pytest.raises(ValueError, match="k_scales"):
            KVCache(2, 4, 4, 1, 16, "float32", "cpu", kv_dtype="fp8", k_scales=bad)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        KVCache(2, 4, 4, 1, 16, "float32", "cpu", kv_dtype="int8")


def test_manager_create_and_gather_dequantize():
    m = PagedAttentionManager.create(1, 8, 4, 2, 16, "float32", "cpu", kv_dtype="fp8", k_scales=0.25)
    rng = np.random.default_rng(3)
    seq = m.add_sequence(6)
    k, v = rand(rng, 6, 2, 16), rand(rng, 6, 2, 16)
    m.kv_cache.write(0, m.slot_mapping([seq])[0] if False else _slots(m, seq, 6), k, v)
    kc, vc = m.kv_cache.gather(0, m.block_table(seq), 6)
    np.testing.assert_array_equal(kc, fp8.dequantize(fp8.quantize(k, "fp8", 0.25), "fp8", 0.25))
    np.testing.assert_array_equal(vc, fp8.dequantize(fp8.quantize(v, "fp8"), "fp8"))
    q = rand(rng, 1, 2, 16)
    got = m.attention(q, [seq], 0)
    np.testing.assert_allclose(got[0], reference.dense_attention(q, kc, vc)[0], rtol=1e-5, atol=1e-6)


def _slots(m, seq, n):
    table, bs = m.block_table(seq), m.block_size
    return np.array([table[t // bs] * bs + t % bs for t in range(n)], dtype=np.int64)


# --------------------------------------------------------------------------------------------- engine
def engine(**kw):
    kw = {"device": "cpu", "block_size": 4, "num_blocks": 256, "seed": 0, "kv_cache_dtype": "fp8", **kw}
    return LLMEngine(EngineConfig(**kw))


def prompts(num=8, seed=0, low=3, high=20):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(rng.integers(low, high))).tolist() for _ in range(num)]


def tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_preemption_recomputes_the_same_bytes(kv_cache_dtype):
    ps = prompts()
    big = engine(kv_cache_dtype=kv_cache_dtype, num_blocks=512)
    ref = tokens(big.generate(ps, GREEDY, progress=False))
    assert big.metrics().num_preemptions == 0 and big.kv_cache.k_pool.dtype == np.uint8
    small = engine(kv_cache_dtype=kv_cache_dtype, num_blocks=12, watermark=0.0)
    assert tokens(small.generate(ps, GREEDY, progress=False)) == ref
    assert small.metrics().num_preemptions > 0
    assert small.manager.block_manager.num_free_blocks == 12


@pytest.mark.parametrize("chunked", [False, True])
def test_prefix_caching_and_chunking_give_the_same_outputs(chunked):
    doc = prompts(1, seed=5, low=30, high=31)[0]
    ps = [doc + p for p in prompts(6, seed=6)]
    ref = tokens(engine(enable_prefix_caching=False, enable_chunked_prefill=False).generate(ps, GREEDY,
                                                                                            progress=False))
    eng = engine(enable_prefix_caching=True, enable_chunked_prefill=chunked, max_num_batched_tokens=64,
                 max_num_seqs=8)
    assert tokens(eng.generate(ps, GREEDY, progress=False)) == ref
    assert eng.metrics().num_prefix_hit_tokens > 0


def test_parallel_branches_copy_fp8_blocks_on_write():
    eng = engine(block_size=4)
    out = eng.generate([prompts(1, seed=7, low=6, high=7)[0]], SamplingParams(temperature=0, max_tokens=6, n=3),
                       progress=False)[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1  # greedy branches agree
    assert eng.manager.num_cow_copies > 0  # the shared partial block was copied (uint8 pools)


def test_beam_search_with_fp8_is_independent_of_prefix_caching():
    ps = prompts(3, seed=8, low=5, high=12)
    a = beam_search(engine(enable_prefix_caching=False), ps, 3, 5)
    b = beam_search(engine(enable_prefix_caching=True), ps, 3, 5)
    assert [o.sequences for o in a] == [o.sequences for o in b]


def test_fp8_is_close_to_the_model_dtype_cache():
    """Not a bit-exact promise: the first greedy token of most prompts agrees with the float32 cache."""
    ps = prompts(16, seed=9)
    one = SamplingParams(temperature=0, max_tokens=1)
    ref = tokens(engine(kv_cache_dtype="auto").generate(ps, one, progress=False))
    got = tokens(engine(calculate_kv_scales=True).generate(ps, one, progress=False))
    assert sum(a == b for a, b in zip(ref, got)) >= 12


def test_calibration_puts_the_largest_value_on_the_formats_max():
    eng = engine(calculate_kv_scales=True, num_blocks=64)
    eng.kv_cache.k_pool[...] = 0  # only written slots count below
    eng.kv_cache.v_pool[...] = 0
    eng.generate(prompts(4, seed=10), SamplingParams(temperature=0, max_tokens=1), progress=False)
    c = eng.kv_cache
    assert (c.k_scales != 1.0).all() and (c.v_scales != 1.0).all()
    for layer in range(c.num_layers):  # each layer's largest |K| and |V| is stored as the max code 0x7e
        assert (c.k_pool[layer] & 0x7F).max() == 0x7E and (c.v_pool[layer] & 0x7F).max() == 0x7E


def test_calibration_runs_once_before_the_first_step():
    eng = engine(calculate_kv_scales=True, num_blocks=64)
    calls = []
    prefill = eng.model.prefill
    eng.model.prefill = lambda batch, cache: calls.append(cache is eng.kv_cache) or prefill(batch, cache)
    eng.generate(prompts(2), GREEDY, progress=False)
    scales = eng.kv_cache.k_scales.copy()
    eng.generate(prompts(2, seed=3), GREEDY, progress=False)
    assert calls[0] is False and calls.count(False) == 1  # one scratch forward, then the engine's cache
    np.testing.assert_array_equal(eng.kv_cache.k_scales, scales)


@pytest.mark.parametrize("names", [("self_attn.k_scale", "self_attn.v_scale"),
                                   ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"),
                                   ("self_attn.kv_scale", None)])
def test_checkpoint_scales_are_read(tmp_path, names):
    def add(t):
        for layer in range(2):
            t[f"model.layers.{layer}.{names[0]}"] = np.array(0.5 + layer, np.float32)
            if names[1]:
                t[f"model.layers.{layer}.{names[1]}"] = np.array([0.25], np.float32)
    folder = tiny_folder(tmp_path / "ckpt", tensor_edit=add)
    eng = LLMEngine.from_checkpoint(folder, EngineConfig(device="cpu", num_blocks=32, kv_cache_dtype="fp8"))
    np.testing.assert_array_equal(eng.kv_cache.k_scales, [0.5, 1.5])
    np.testing.assert_array_equal(eng.kv_cache.v_scales, [0.25, 0.25] if names[1] else [0.5, 1.5])
    auto = LLMEngine.from_checkpoint(folder, EngineConfig(device="cpu", num_blocks=32))  # the names load
    assert not auto.kv_cache.is_fp8


@pytest.mark.parametrize("value, match", [(np.array(0.0, np.float32), "finite number > 0"),
                                          (np.array(np.nan, np.float32), "finite number > 0"),
                                          (np.array(-np.inf, np.float32), "finite number > 0"),
                                          (np.ones(2, np.float32), "must be one float"),
                                          (np.array(1, np.int32), "must be one float")])
def test_bad_checkpoint_scales_are_refused(tmp_path, value, match):
    def add(t):
        t["model.layers.1.self_attn.k_scale"] = value
    folder = tiny_folder(tmp_path / "ckpt", tensor_edit=add)
    with pytest.raises(ValueError, match=match):
        LLMEngine.from_checkpoint(folder, EngineConfig(device="cpu", num_blocks=32, kv_cache_dtype="fp8"))


@pytest.mark.parametrize("value", ["int8", "FP8", "float16", "", None, 8])
def test_unknown_kv_cache_dtype_is_refused(value):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype=value)
    with pytest.raises(ValueError, match="calculate_kv_scales"):
        EngineConfig(calculate_kv_scales=1)


def test_fp8_on_an_unfit_gpu_is_refused_before_allocation(monkeypatch):
    from pagedkv.engine import build
    from pagedkv.model import get_config

    class FakeGPU:
        is_gpu, name = True, "gpu"

    with pytest.raises(ValueError, match="needs a float16 or bfloat16 model"):
        build.build_kv_cache(EngineConfig(kv_cache_dtype="fp8", num_blocks=4), get_config("tiny"), np.float32,
                             FakeGPU())
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*8\.6"):
        fp8.check_device_supports_fp8("86")


def test_llm_and_server_flag():
    from pagedkv import LLM
    from pagedkv.serve.cli import build_parser, engine_options

    llm = LLM("tiny", device="cpu", num_blocks=64, kv_cache_dtype="fp8")
    assert llm.engine.kv_cache.kv_dtype == "fp8_e4m3"
    out = llm.generate([[1, 2, 3]], GREEDY, progress=False) if "progress" in LLM.generate.__code__.co_varnames \
        else llm.generate([[1, 2, 3]], GREEDY)
    assert len(out[0].outputs[0].token_ids) == 10
    args = build_parser().parse_args(["--model", "tiny", "--kv-cache-dtype", "fp8_e5m2", "--device", "cpu"])
    assert engine_options(args)["kv_cache_dtype"] == "fp8_e5m2"
    assert "kv_cache_dtype" not in engine_options(build_parser().parse_args(["--model", "tiny"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "tiny", "--kv-cache-dtype", "int8"])


def test_saved_checkpoint_round_trips_with_its_kv_scales(tmp_path):
    from pagedkv.model import get_config, load_checkpoint, random_weights
    from pagedkv.model.export import save_checkpoint

    config = get_config("tiny", qkv_bias=True)
    weights = random_weights(config, seed=4, device="cpu")
    folder = save_checkpoint(tmp_path / "qwen", config, weights, kv_scales=([0.5, 0.25], [2.0, 4.0]))
    loaded_config, loaded = load_checkpoint(folder, device="cpu")
    assert loaded_config == config
    np.testing.assert_array_equal(loaded.layers[1].wqkv, weights.layers[1].wqkv)
    np.testing.assert_array_equal(loaded.layers[0].bqkv, weights.layers[0].bqkv)
    eng = LLMEngine.from_checkpoint(folder, EngineConfig(device="cpu", num_blocks=32, kv_cache_dtype="fp8_e5m2"))
    np.testing.assert_array_equal(eng.kv_cache.v_scales, [2.0, 4.0])


def test_every_host_attention_path_reads_the_stored_bytes():
    """The reference and dense prefill paths of the attention backend with an fp8 pool: both read the
    dequantized cache (the dense path takes no varlen shortcut over the unquantized k, v), so their logits
    agree; and they differ from the same model on a float32 pool (quantization is really there)."""
    from pagedkv.backend import get_backend
    from pagedkv.model import LlamaModel, PrefillBatch, get_config, random_weights

    config = get_config("tiny")
    weights = random_weights(config, seed=5, device="cpu")
    backend = get_backend("cpu")
    rng = np.random.default_rng(6)
    lens = [7, 12]
    positions = np.concatenate([np.arange(n) for n in lens])
    batch = PrefillBatch(token_ids=rng.integers(0, 256, sum(lens)), positions=positions,
                         slot_mapping=np.concatenate([np.arange(7), 16 + np.arange(12)]), seq_lens=lens,
                         num_cached=[0, 0], block_tables=[[0, 1], [4, 5, 6]])
    logits = {}
    for kv, paged in (("fp8", None), ("fp8", False), ("auto", None)):
        cache = KVCache(config.num_layers, 8, 4, config.num_kv_heads, config.head_dim, "float32", "cpu", kv)
        model = LlamaModel(config, weights, backend, paged_prefill=paged)
        logits[kv, paged] = np.asarray(model.prefill(batch, cache), dtype=np.float64)
    np.testing.assert_allclose(logits["fp8", False], logits["fp8", None], rtol=1e-4, atol=1e-4)
    assert np.abs(logits["fp8", None] - logits["auto", None]).max() > 1e-3
