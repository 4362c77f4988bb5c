"""Cascade attention in the engine (issue 17): the attention backend's per-step choice and its metadata, and
outputs identical with cascade on and off (CPU: float64 reference paths; GPU: float16 graphs, marked ``gpu``)."""
import numpy as np
import pytest

from pagedkv.cascade import CascadeRule
from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams
from pagedkv.model.cascade_backend import CASCADE, CascadeBackend

EAGER_RULE = CascadeRule(min_prefix_tokens=4, min_saved_tokens=0)


def engine(cascade, **kwargs):
    kwargs = {"device": "cpu", "block_size": 4, "num_blocks": 512, "seed": 0, "cascade_attention": cascade, **kwargs}
    eng = LLMEngine(EngineConfig(**kwargs))
    cascade_of(eng).rule = EAGER_RULE  # NOTE: tiny prompts: the default rule never pays off there
    return eng


def cascade_of(eng):
    """The attention backend's cascade state (what only measurements and tests look at)."""
    return eng.model.attention.cascade


def shared_prompts(num=6, doc_len=42, own=3, seed=0):
    rng = np.random.default_rng(seed)
    doc = rng.integers(0, 256, doc_len).tolist()
    return [doc + rng.integers(0, 256, own).tolist() for _ in range(num)]


@pytest.mark.parametrize("caching", [True, False])
def test_greedy_outputs_identical_cascade_on_and_off(caching):
    prompts = shared_prompts() + [list(range(9, 30))]  # a request sharing nothing
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    on, off = engine(True, enable_prefix_caching=caching), engine(False, enable_prefix_caching=caching)
    got = [o.outputs[0].token_ids for o in on.generate(prompts, params, progress=False)]
    want = [o.outputs[0].token_ids for o in off.generate(prompts, params, progress=False)]
    assert got == want
    # with caching the document's blocks are shared and cascade runs; without, nothing is shared
    assert (cascade_of(on).num_cascade_steps > 0) == caching
    assert cascade_of(off).num_cascade_steps == 0


def test_parallel_sampling_branches_use_cascade():
    """n branches of one request share their prompt blocks (fork_sequence): the same tokens on and off."""
    params = SamplingParams(temperature=0.8, n=4, max_tokens=10, seed=3, ignore_eos=True)
    prompts = shared_prompts(num=2, doc_len=30, own=5, seed=1)
    on, off = engine(True, enable_prefix_caching=False), engine(False, enable_prefix_caching=False)
    got = [[c.token_ids for c in o.outputs] for o in on.generate(prompts, params, progress=False)]
    want = [[c.token_ids for c in o.outputs] for o in off.generate(prompts, params, progress=False)]
    assert got == want
    assert cascade_of(on).num_cascade_steps > 0


def test_default_is_off_on_the_cpu_and_with_tensor_parallelism():
    eng = LLMEngine(EngineConfig(device="cpu", num_blocks=64))
    assert not cascade_of(eng).enabled and eng.runner.variants == ()
    tp = LLMEngine(EngineConfig(device="cpu", num_blocks=64, tensor_parallel_size=2, cascade_attention=True))
    assert tp.runner.variants == ()  # the ranks' backends are not asked


def test_host_backend_runs_any_head_dim():
    assert CascadeBackend(np, max_rows=4, block_size=16, head_dim=16).enabled  # the float64 reference


@pytest.mark.gpu
def test_gpu_backend_off_for_head_dims_without_kernels():
    import cupy

    assert not CascadeBackend(cupy, max_rows=4, block_size=16, head_dim=16).enabled
    assert CascadeBackend(cupy, max_rows=4, block_size=16, head_dim=64).enabled
    with pytest.raises(ValueError, match="cascade_attention"):
        EngineConfig(device="cpu", cascade_attention="yes")


def test_backend_plan_upload_and_padding():
    backend = CascadeBackend(np, max_rows=8, block_size=4, rule=EAGER_RULE)
    tables = np.zeros((8, 6), dtype=np.int32)
    tables[:3, :3] = [7, 8, 9]
    tables[:3, 3] = [20, 21, 22]
    tables[3] = [30, 31, 0, 0, 0, 0]
    lens = np.array([14, 15, 13, 6, 1, 1, 1, 1], dtype=np.int32)
    assert backend.prepare(tables, lens, 4) == CASCADE
    g = backend.max_groups
    assert backend.group_starts.tolist() == [0, 3] + [3] * (g - 1)
    assert backend.prefix_lens.tolist() == [12] + [0] * (g - 1)
    assert backend.group_rows[:3].tolist() == [0, 1, 2]
    assert backend.suffix_starts.tolist() == [12, 12, 12, 0, 0, 0, 0, 0]
    assert backend.prepare(tables, lens, 1) is None  # one row: nothing to share
    backend.enabled = False
    assert backend.prepare(tables, lens, 4) is None


def test_backend_keeps_the_largest_groups():
    from pagedkv.model import cascade_backend

    backend = CascadeBackend(np, max_rows=40, block_size=4, rule=EAGER_RULE)
    tables = np.zeros((40, 8), dtype=np.int32)
    for r in range(40):  # 20 groups of 2 rows, group i sharing i + 1 blocks
        i = r // 2
        tables[r, :i % 6 + 1] = 1000 + 10 * i + np.arange(i % 6 + 1)
        tables[r, i % 6 + 1] = 5000 + r
    lens = np.array([4 * ((r // 2) % 6 + 1) + 2 for r in range(40)], dtype=np.int32)
    assert backend.prepare(tables, lens, 40) == CASCADE
    assert backend.max_groups == cascade_backend.MAX_GROUPS < 20
    kept = backend.prefix_lens[:backend.max_groups]
    assert sorted(kept.tolist(), reverse=True)[-1] >= 8  # the smallest prefixes were dropped first


@pytest.mark.gpu
def test_gpu_float16_greedy_identical_cascade_on_and_off():
    """float16, CUDA graphs: requests over one shared document, greedy, cascade on (default rule made eager) and
    off: at most one request of 16 may differ (float16 rounding of the two paths)."""
    from engine_gpu_support import GPU_MODEL

    from pagedkv.model import ModelConfig

    prompts = shared_prompts(num=16, doc_len=300, own=5)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = {}
    for cascade in (True, False):
        eng = LLMEngine(EngineConfig(model=ModelConfig(**GPU_MODEL), dtype="float16", device="gpu", num_blocks=2048,
                                     seed=0, max_model_len=512, cuda_graph=True, cascade_attention=cascade))
        cascade_of(eng).rule = CascadeRule(min_prefix_tokens=16, min_saved_tokens=0)
        outs[cascade] = [o.outputs[0].token_ids for o in eng.generate(prompts, params, progress=False)]
        if cascade:
            assert cascade_of(eng).num_cascade_steps > 0
            assert eng.graph_error is None
    same = sum(a == b for a, b in zip(outs[True], outs[False]))
    assert same >= 15, f"{same}/16 identical"


def test_attention_backend_routes_the_cascade_variant():
    """plan_rows takes the cascade path for the variant prepare_decode answered, and the layer call (write K/V,
    then attend) gives what the plain decode path gives (CPU: float64 references on both sides)."""
    from pagedkv.cache import KVCache
    from pagedkv.model import DecodeBatch
    from pagedkv.model.attention import AttentionBackend

    rng = np.random.default_rng(5)
    cache = KVCache(1, 16, 4, 2, 8, "float32", "cpu")
    cache.k_cache(0)[...] = rng.standard_normal(cache.k_cache(0).shape)
    cache.v_cache(0)[...] = rng.standard_normal(cache.v_cache(0).shape)
    tables = np.array([[0, 1, 2, 5], [0, 1, 2, 6], [3, 4, 7, 8]], dtype=np.int32)
    lens = np.array([14, 13, 15], dtype=np.int32)
    backend = AttentionBackend(4, 2, 8, np, is_gpu=False)
    assert backend.setup_decode(8, 4, cascade=True) == (CASCADE,)
    backend.cascade.rule = EAGER_RULE
    variant = backend.prepare_decode(tables, lens, 3)
    assert variant == CASCADE and backend.cascade.prefix_lens[0] == 12  # rows 0, 1 share blocks 0-2
    q, k, v = (rng.standard_normal((3, h, 8)).astype(np.float32) for h in (4, 2, 2))
    slots = (tables[np.arange(3), (lens - 1) // 4] * 4 + (lens - 1) % 4).astype(np.int64)
    outs = []
    for var in (variant, None):
        batch = DecodeBatch(token_ids=None, positions=lens - 1, slot_mapping=slots, block_tables=tables,
                            context_lens=lens, attention_variant=var)
        meta = backend.plan_rows(batch, cache)
        assert meta.path == ("cascade" if var else "decode")
        outs.append(backend(0, q, k, v, meta))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
