"""The engine's choice of decode kernel per step (issue 16): decode version 4 (tensor cores) where
``decode_tc.tc_decode_pays`` says its grid is balanced enough for the step's lengths, else the default
dispatcher (kernel 3).

CPU: the rule on the benchmark's cases (its answers are the kernels kernel_bench measured fastest on an H100,
README 7c), its edges, the backend's variant plumbing. GPU (``gpu`` mark): ``decode.choose_version`` and the
attention backend's variant against the float64 reference, and the engine's greedy outputs with the tensor-core
variant on and off.
"""
import numpy as np
import pytest

from experiments.kernel_bench import BLOCK_SIZE, CASES, SEED
from pagedkv.engine import EngineConfig
from pagedkv.kernels import decode_tc
from pagedkv.kernels.decode_tc import TC_SMALL_PIECE, tc_decode_pays, tc_longest_piece

gpu = pytest.mark.gpu
H100_RESIDENT = {64: 4 * 132, 128: 2 * 132}  # version 4's resident blocks on an H100 (kernel_bench's v4_plan)
# kernel_bench's 16 cases in order: does version 4 beat the default there (H100, 2026-12-07, README 7c)? None: the
# case's head_dim has no version 4 (80)
MEASURED_WINNER_IS_V4 = [True, True, True, True, True, True, True, False, False, True, True, False, False, True,
                         None, True]


def _case_lens():
    """The context lengths of every kernel_bench case, drawn as kernel_bench draws them."""
    rng = np.random.default_rng(SEED)
    for case in CASES:
        lens = case.context_lens(rng)
        rng.permutation(int((-(-lens // BLOCK_SIZE)).sum()))  # build_case's table shuffle
        yield case, lens


def test_rule_picks_the_measured_winner_on_every_benchmark_case():
    assert len(MEASURED_WINNER_IS_V4) == len(CASES)
    for (case, lens), v4_won in zip(_case_lens(), MEASURED_WINNER_IS_V4):
        if v4_won is None:
            assert case.head_dim not in decode_tc.HEAD_DIMS
            continue
        resident = H100_RESIDENT[case.head_dim]
        capacity = int(-(-lens.max() // BLOCK_SIZE)) * BLOCK_SIZE
        parts, _ = decode_tc.partition_plan(case.batch, case.num_kv_heads, capacity, resident)
        got = tc_decode_pays(lens, case.num_qo_heads, case.num_kv_heads, parts, resident)
        assert got == v4_won, f"{case.label()}: rule says v4={got}, measured v4 fastest={v4_won}"


def test_rule_edges():
    gqa = dict(num_qo_heads=32, num_kv_heads=8)
    assert not tc_decode_pays([], **gqa, parts=1, resident_ctas=264)
    assert not tc_decode_pays([0, 0], **gqa, parts=1, resident_ctas=264)  # padding rows only
    assert not tc_decode_pays([100] * 4, num_qo_heads=8, num_kv_heads=8, parts=1, resident_ctas=264)  # MHA
    # a short step pays whatever its balance; one long row among short ones does not
    assert tc_decode_pays([TC_SMALL_PIECE] + [1] * 7, **gqa, parts=1, resident_ctas=264)
    assert not tc_decode_pays([TC_SMALL_PIECE + 1] + [1] * 7, **gqa, parts=1, resident_ctas=264)
    # the same long row split into enough partitions pays again
    assert tc_decode_pays([32768] + [1] * 7, **gqa, parts=32, resident_ctas=264)
    assert tc_longest_piece(32768, 32) == 1024 and tc_longest_piece(1, 5) == 64 and tc_longest_piece(700, 2) == 384


def test_backend_plumbing_on_the_cpu():
    """No tensor-core variant on the host; a TENSOR_CORES batch still plans the decode path with version 4 (the
    host op ignores the version: float64 reference)."""
    from pagedkv.cache import KVCache
    from pagedkv.model import DecodeBatch
    from pagedkv.model.attention import TENSOR_CORES, AttentionBackend

    cache = KVCache(1, 8, 4, 2, 64, "float32", "cpu")
    backend = AttentionBackend(8, 2, 64, np, is_gpu=False)
    assert backend.setup_decode(8, 4, cascade=False, kv_cache=cache) == ()
    tables, lens = np.zeros((2, 2), dtype=np.int32), np.array([3, 5], dtype=np.int32)
    assert backend.prepare_decode(tables, lens, 2) is None and backend.num_tensor_core_steps == 0
    batch = DecodeBatch(token_ids=None, positions=lens - 1, slot_mapping=np.zeros(2, np.int64), block_tables=tables,
                        context_lens=lens, attention_variant=TENSOR_CORES)
    meta = backend.plan_rows(batch, cache)
    assert (meta.path, meta.decode_version) == ("decode", 4)
    batch.attention_variant = None
    assert backend.plan_rows(batch, cache).decode_version is None


def test_engine_config_tensor_core_decode():
    assert EngineConfig(device="cpu").tensor_core_decode is False  # opt-in until it is timed
    assert EngineConfig(device="cpu", tensor_core_decode=True).tensor_core_decode is True
    with pytest.raises(ValueError, match="tensor_core_decode"):
        EngineConfig(device="cpu", tensor_core_decode="no")


# ---- GPU -----------------------------------------------------------------------------------------------

@gpu
def test_choose_version_and_backend_variant_against_the_reference():
    """choose_version: 4 for a uniform GQA batch, None for one long row among short ones, None for MHA and for a
    head_dim without version 4; the backend answers TENSOR_CORES for the first and its layer call (write, attend
    with version 4) matches the float64 reference, as the default's does."""
    import cupy

    from pagedkv.cache import KVCache
    from pagedkv.kernels import decode
    from pagedkv.kernels.reference import paged_decode_attention
    from pagedkv.model import DecodeBatch
    from pagedkv.model.attention import TENSOR_CORES, AttentionBackend

    rng = np.random.default_rng(16)
    bs, width = 16, 64  # a table of 1024 tokens' capacity
    uniform, mixed = np.full(12, 700, np.int32), np.array([1024] + [3] * 63, np.int32)
    assert decode.choose_version((12, 32, 128), (0, 8, bs, 128), width, 1, 1, uniform) == 4
    assert decode.choose_version((64, 32, 128), (0, 8, bs, 128), 2048, 1, 1, np.r_[32768, mixed[1:]]) is None
    assert decode.choose_version((12, 8, 128), (0, 8, bs, 128), width, 1, 1, uniform) is None  # MHA
    assert decode.choose_version((12, 32, 80), (0, 8, bs, 80), width, 1, 1, uniform) is None  # no hd 80
    cache = KVCache(1, 12 * width, bs, 8, 128, "float16", "gpu")
    tables = rng.permutation(12 * width).astype(np.int32).reshape(12, width)
    unused = np.arange(700, width * bs)  # every row's slots past its length: NaN, never to be read
    for pool in (cache.k_cache(0), cache.v_cache(0)):
        host = rng.standard_normal(pool.shape).astype(np.float16)
        host[tables[:, unused // bs], :, unused % bs] = np.nan
        pool[...] = cupy.asarray(host)
    backend = AttentionBackend(32, 8, 128, cupy, is_gpu=True, check=True)
    assert TENSOR_CORES in backend.setup_decode(16, bs, cascade=False, kv_cache=cache)
    assert backend.prepare_decode(tables, uniform, 12, 16) == TENSOR_CORES
    q, k, v = (rng.standard_normal((12, h, 128)).astype(np.float16) for h in (32, 8, 8))
    slots = (tables[np.arange(12), (uniform - 1) // bs] * bs + (uniform - 1) % bs).astype(np.int64)
    outs = []
    for variant in (TENSOR_CORES, None):
        batch = DecodeBatch(token_ids=None, positions=None, slot_mapping=cupy.asarray(slots),
                            block_tables=cupy.asarray(tables), context_lens=cupy.asarray(uniform),
                            attention_variant=variant)
        meta = backend.plan_rows(batch, cache)
        assert meta.decode_version == (4 if variant else None)
        outs.append(cupy.asnumpy(backend(0, cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), meta)))
    kc, vc = cupy.asnumpy(cache.k_cache(0)), cupy.asnumpy(cache.v_cache(0))
    ref = paged_decode_attention(q.astype(np.float64), kc.astype(np.float64), vc.astype(np.float64), tables, uniform)
    for out in outs:
        assert np.isfinite(out).all()
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 2e-3


@gpu
def test_engine_greedy_with_tensor_core_decode_on_and_off():
    """float16, CUDA graphs, GQA 2 x head_dim 64: the tensor-core variant runs decode steps (counted) and the
    greedy outputs agree with the default kernel's: at most one request of 16 may differ (float16 rounding of
    the two kernels' probabilities)."""
    from engine_gpu_support import GPU_MODEL

    from pagedkv.engine import LLMEngine, SamplingParams
    from pagedkv.model import ModelConfig

    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 512, int(n)).tolist() for n in rng.integers(5, 200, 16)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = {}
    for on in (True, False):
        eng = LLMEngine(EngineConfig(model=ModelConfig(**GPU_MODEL), dtype="float16", device="gpu", num_blocks=2048,
                                     seed=0, max_model_len=512, cuda_graph=True, tensor_core_decode=on))
        outs[on] = [o.outputs[0].token_ids for o in eng.generate(prompts, params, progress=False)]
        assert (eng.model.attention.num_tensor_core_steps > 0) == on
        assert eng.graph_error is None
    same = sum(a == b for a, b in zip(outs[True], outs[False]))
    assert same >= 15, f"{same}/16 identical"
