"""Tensor parallelism's sharding math on the CPU (issue 22): N ranks as threads of one process whose
collectives are sums (the simulated world) give the unsharded model's logits, and its greedy tokens in float32."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedkv.backend import get_backend
from pagedkv.cache.kv_cache import KVCache
from pagedkv.model import LlamaModel, ModelConfig, random_weights
from pagedkv.model.llama import DecodeBatch, PrefillBatch
from pagedkv.model.parallel_model import ParallelModel, ShardedKVCache
from pagedkv.model.tensor_parallel import (Collective, TensorParallelPlan, ThreadWorld, WorldBroken, run_ranks,
                                           shard_weights)

CPU = get_backend("cpu")
BLOCK = 4


def config(**overrides):
    base = dict(vocab_size=250, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                intermediate_size=96, max_position_embeddings=256)
    return ModelConfig(**{**base, **overrides})


class Ranks:
    """The unsharded model (``size`` None) or a ParallelModel of ``size`` ranks, with its KV pool(s)."""

    def __init__(self, cfg, weights, dtype, size=None, num_blocks=64):
        if size is None:
            self.model = LlamaModel(cfg, weights, CPU)
            self.cache = KVCache(cfg.num_layers, num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim, dtype, "cpu")
        else:
            self.model = ParallelModel(cfg, weights, CPU, size)
            self.cache = self.model.make_kv_cache(num_blocks, BLOCK, dtype, "cpu")

    def run(self, method, batch):
        return getattr(self.model, method)(batch, self.cache)


def greedy(ranks: Ranks, prompts, steps):
    """Prefill every prompt in one batch, then ``steps`` batched decode steps; logits and tokens per step."""
    tables = [list(range(i * 16, (i + 1) * 16)) for i in range(len(prompts))]

    def slots(i, positions):
        return [tables[i][p // BLOCK] * BLOCK + p % BLOCK for p in positions]

    batch = PrefillBatch(token_ids=np.concatenate(prompts), positions=np.concatenate([np.arange(len(p)) for p in prompts]),
                         slot_mapping=np.concatenate([slots(i, range(len(p))) for i, p in enumerate(prompts)]),
                         seq_lens=[len(p) for p in prompts], num_cached=[0] * len(prompts), block_tables=tables)
    logits = [ranks.run("prefill", batch)]
    tokens = [np.argmax(logits[-1], axis=-1)]
    lens = [len(p) for p in prompts]
    for _ in range(steps):
        width = max(len(t) for t in tables)
        block_tables = np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int32)
        batch = DecodeBatch(token_ids=tokens[-1].astype(np.int64), positions=np.array(lens, dtype=np.int64),
                            slot_mapping=np.array([slots(i, [n])[0] for i, n in enumerate(lens)], dtype=np.int64),
                            block_tables=block_tables, context_lens=np.array(lens, dtype=np.int32) + 1)
        logits.append(ranks.run("decode", batch))
        tokens.append(np.argmax(logits[-1], axis=-1))
        lens = [n + 1 for n in lens]
    return logits, np.stack(tokens, axis=1)


PROMPTS = [np.array([5, 17, 101, 3, 249, 0, 42]), np.array([7, 7, 7]), np.array([200, 13, 77, 1, 2, 3, 4, 5, 6, 9, 11])]


@pytest.mark.parametrize("size", [2, 4, 8])
@pytest.mark.parametrize("variant", ["gqa", "qwen2-bias", "tied", "mqa"])
def test_sharded_ranks_give_the_unsharded_logits_and_greedy_tokens_in_float32(size, variant):
    overrides = {"gqa": {}, "qwen2-bias": {"qkv_bias": True}, "tied": {"tie_word_embeddings": True},
                 "mqa": {"num_kv_heads": 1}}[variant]
    cfg = config(**overrides)
    weights = random_weights(cfg, seed=3, dtype="float32", device="cpu")
    want_logits, want = greedy(Ranks(cfg, weights, "float32"), PROMPTS, steps=6)
    got_logits, got = greedy(Ranks(cfg, weights, "float32", size=size), PROMPTS, steps=6)
    np.testing.assert_array_equal(got, want)  # token-identical
    for a, b in zip(got_logits, want_logits):  # NOTE: float32 partial sums added in another order
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([(8, 8), (8, 4), (8, 2), (8, 1), (4, 4), (16, 2)]), st.sampled_from([1, 2, 4, 8]),
       st.integers(5, 300))
def test_shards_cover_every_head_column_and_vocab_row_once(heads, size, vocab):
    num_heads, num_kv_heads = heads
    if num_heads % size or (num_kv_heads >= size and num_kv_heads % size) or (num_kv_heads < size and size % num_kv_heads):
        with pytest.raises(ValueError):
            TensorParallelPlan(config(num_heads=num_heads, num_kv_heads=num_kv_heads, vocab_size=vocab), size, 0)
        return
    cfg = config(num_heads=num_heads, num_kv_heads=num_kv_heads, vocab_size=vocab)
    plans = [TensorParallelPlan(cfg, size, r) for r in range(size)]
    assert sorted(h for p in plans for h in p.q_heads()) == list(range(num_heads))
    assert sorted(t for p in plans for t in p.vocab_range()) == list(range(vocab))
    kv = {h for p in plans for h in p.kv_heads()}
    assert kv == set(range(num_kv_heads))
    group = num_heads // num_kv_heads
    for p in plans:  # every local query head reads a KV head the rank holds
        assert all(h // group in p.kv_heads() for h in p.q_heads())
        assert p.kv_heads().index(p.q_heads()[0] // group) == 0


@pytest.mark.parametrize("size, kwargs, fragment", [
    (3, dict(num_heads=8, num_kv_heads=4), "does not divide num_heads"),
    (4, dict(num_heads=12, num_kv_heads=6), "num_kv_heads=6: one must divide the other"),
    (4, dict(intermediate_size=90), "does not divide intermediate_size"),
    (0, {}, "tensor_parallel_size must be a positive int"),
])
def test_splits_that_do_not_divide_the_model_are_refused(size, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        TensorParallelPlan(config(**kwargs), size, 0)


@pytest.mark.parametrize("rank", [-1, 2, True, 1.0])
def test_bad_ranks_are_refused(rank):
    with pytest.raises(ValueError, match="rank must be"):
        TensorParallelPlan(config(), 2, rank)


def test_a_rank_that_raises_breaks_the_world_and_nobody_hangs():
    world = ThreadWorld(3, timeout=30)

    def fn(rank):
        group = world.group(rank)
        group.all_reduce(np.ones(4))
        if rank == 1:
            raise RuntimeError("rank 1 died")
        return group.all_reduce(np.ones(4))  # ranks 0 and 2 would wait for rank 1 for ever

    with pytest.raises(RuntimeError, match="rank 1 died"):
        run_ranks(world, fn)
    out = run_ranks(world, lambda r: world.group(r).all_reduce(np.full(2, r + 1.0)))  # usable again
    assert all((o == 6.0).all() for o in out)


def test_a_rank_that_never_arrives_times_out():
    world = ThreadWorld(2, timeout=0.5)
    with pytest.raises(WorldBroken):
        run_ranks(world, lambda r: world.group(r).all_reduce(np.ones(1)) if r == 0 else None)


def test_collectives_sum_in_rank_order_and_gather_in_rank_order():
    world = ThreadWorld(4)
    out = run_ranks(world, lambda r: (world.group(r).all_reduce(np.array([r, 10.0 * r])),
                                      world.group(r).all_gather(np.array([[r, r]]))))
    for total, gathered in out:
        np.testing.assert_array_equal(total, [6.0, 60.0])
        np.testing.assert_array_equal(gathered, [[0, 0, 1, 1, 2, 2, 3, 3]])
    assert Collective().all_reduce(5) == 5  # one rank: the identity


def test_every_rank_gets_the_same_gathered_logits_and_copies_reach_every_pool():
    cfg = config()
    model = ParallelModel(cfg, random_weights(cfg, seed=0, dtype="float32", device="cpu"), CPU, 4)
    cache = model.make_kv_cache(8, BLOCK, "float32", "cpu")
    assert [c.num_kv_heads for c in cache.ranks] == [1, 1, 1, 1] and cache.num_blocks == 8
    assert cache.bytes_per_block == sum(c.bytes_per_block for c in cache.ranks)
    for c in cache.ranks:
        c.k_pool[:] = np.random.default_rng(0).standard_normal(c.k_pool.shape)
    cache.copy_blocks([2], [5])
    assert all((c.k_pool[:, 5] == c.k_pool[:, 2]).all() for c in cache.ranks)
    batch = DecodeBatch(token_ids=np.array([1, 2]), positions=np.array([0, 0]), slot_mapping=np.array([0, 4]),
                        block_tables=np.array([[0], [1]], dtype=np.int32), context_lens=np.array([1, 1], np.int32))
    outs = run_ranks(model.world, lambda r: model.ranks[r].decode(batch, cache.ranks[r]))
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    with pytest.raises(ValueError, match="same blocks"):
        ShardedKVCache([cache.ranks[0], KVCache(2, 9, BLOCK, 1, 8, "float32", "cpu")])


# -- the engine with tensor_parallel_size > 1 (ranks as threads on the CPU) ------------------------------------------
def _engine(tp, **overrides):
    from pagedkv.engine import EngineConfig, LLMEngine

    cfg = config(max_position_embeddings=512)
    return LLMEngine(EngineConfig(**{**dict(model=cfg, dtype="float32", device="cpu", num_blocks=96, block_size=8,
                                            max_num_batched_tokens=40, max_num_seqs=32, tensor_parallel_size=tp),
                                       **overrides}),
                     model_config=cfg, weights=random_weights(cfg, seed=5, dtype="float32", device="cpu"))


def _prompts(num, seed=0):
    rng = np.random.default_rng(seed)
    doc = rng.integers(0, 250, 30).tolist()
    return [doc[: int(rng.integers(0, 30))] + rng.integers(0, 250, int(rng.integers(1, 20))).tolist()
            for _ in range(num)]


@pytest.mark.parametrize("tp", [2, 4])
def test_engine_outputs_with_tensor_parallelism_equal_one_rank_in_float32(tp):
    """Issue 22's target on the CPU simulated world: greedy, chunked prefill, prefix caching, n=2 (forks, CoW)."""
    from pagedkv.engine import SamplingParams

    params = SamplingParams(n=2, temperature=0, max_tokens=16, ignore_eos=True)
    prompts = _prompts(16)
    want = [[c.token_ids for c in o.outputs] for o in _engine(1).generate(prompts, params, progress=False)]
    eng = _engine(tp)
    got = [[c.token_ids for c in o.outputs] for o in eng.generate(prompts, params, progress=False)]
    assert got == want
    assert eng.kv_cache.num_blocks == 96 and len(eng.kv_cache.ranks) == tp


def test_a_rank_that_fails_mid_run_aborts_the_step_and_frees_its_blocks():
    """Issue 22: a rank that dies fails the in-flight requests with an error; nobody hangs; nothing leaks."""
    from test_engine_lifecycle import pool_free

    from pagedkv.engine import SamplingParams

    eng = _engine(2)
    ids = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=8)) for p in _prompts(3)]
    eng.step()
    rank1, calls = eng.model.ranks[1], [0]
    real = rank1.prefill, rank1.decode

    def dying(*args, **kwargs):
        calls[0] += 1
        raise RuntimeError("rank 1 died")
    rank1.prefill = rank1.decode = dying
    with pytest.raises(RuntimeError, match="rank 1 died"):
        eng.step()
    assert calls[0] == 1 and not eng.requests
    outs = eng.step()
    assert sorted(o.request_id for o in outs) == sorted(ids)
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert pool_free(eng)
    rank1.prefill, rank1.decode = real
    out = eng.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4), progress=False)
    assert out[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be an int in"),
    (dict(tensor_parallel_size=3), "does not divide num_heads"),
    (dict(tensor_parallel_size=2, cuda_graph=True), "without CUDA graphs"),
])
def test_bad_tensor_parallel_settings_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        _engine(**{"tp": kwargs.pop("tensor_parallel_size")}, **kwargs)
