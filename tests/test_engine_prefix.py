"""Automatic prefix caching in the engine (issue 10), each test guarding a known failure of other engines: a stale
hash after eviction, a fully cached prompt, a block freed while a scheduled step still uses it, blocks leaked at
idle; outputs identical with caching and chunking on or off (float32 greedy, preemption, n > 1)."""
import numpy as np
import pytest

from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6)


def engine(**kwargs):
    kwargs = {"device": "cpu", "block_size": 4, "num_blocks": 256, "seed": 0, **kwargs}
    return checked(LLMEngine(EngineConfig(**kwargs)))


def checked(eng):
    """Check, at every step, what the scheduler hands the model: live sequences on used blocks, slots written
    once, and never a write into a block that carries a hash (cached blocks are full and shared)."""
    schedule = eng.scheduler.schedule

    def schedule_and_check():
        out = schedule()
        m, bm = eng.manager, eng.manager.block_manager
        bm.check_invariants()
        live, slots = set(m.seq_ids), []
        for s in out.seqs:
            assert s.branch.seq_id in live, "a scheduled sequence was freed"
            table = m.block_table(s.branch.seq_id)
            assert all(bm.ref_count(b) >= 1 for b in table), "a scheduled sequence holds a freed block"
            written = {table[p // m.block_size] for p in range(s.start, s.end)}
            assert all(bm.block_hash(b) is None for b in written), "a step writes into a cached block"
            slots.extend(m.slots(s.branch.seq_id, s.start, s.end).tolist())
        assert len(slots) == len(set(slots)), "two scheduled tokens write the same slot"
        return out
    eng.scheduler.schedule = schedule_and_check
    return eng


def idle_and_clean(eng) -> bool:
    """Nothing leaked: every block is free or cached-and-evictable, no sequence, no request."""
    bm = eng.manager.block_manager
    bm.check_invariants()
    return bm.num_free_blocks == bm.num_blocks and not eng.manager.seq_ids and not eng.requests


def tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


DOC = list(np.random.default_rng(7).integers(0, 256, 40))  # 10 full blocks of 4


@pytest.mark.parametrize("doc_len", [40, 42])  # whole blocks, or 2 tokens into the 11th block
def test_requests_sharing_a_document_compute_it_once(doc_len):
    doc = DOC + [77, 78]
    prompts = [doc[:doc_len] + [i, i + 1, i + 2] for i in range(6)]
    eng = engine()
    outs = eng.generate(prompts, GREEDY, progress=False)
    # the document's last 2 tokens share a block with each request's own: copied from a sibling, not computed
    assert [o.num_cached_tokens for o in outs] == [0] + [doc_len] * 5
    m = eng.metrics()
    assert m.num_prefill_tokens == doc_len + 6 * 3  # the document once, then each request's own 3 tokens
    assert (m.num_prefix_query_tokens, m.num_prefix_hit_tokens) == (6 * (doc_len + 3), 5 * doc_len)
    assert (m.num_prefix_query_blocks, m.num_prefix_hit_blocks) == (6 * ((doc_len + 3) // 4), 5 * 10)
    assert m.prefix_cache_hit_rate == pytest.approx(5 * doc_len / (6 * (doc_len + 3)))
    off = engine(enable_prefix_caching=False)
    assert tokens(outs) == tokens(off.generate(prompts, GREEDY, progress=False))
    assert off.metrics().num_prefill_tokens == 6 * (doc_len + 3) and off.metrics().num_cached_blocks == 0
    assert idle_and_clean(eng) and m.num_cached_blocks >= 10 and eng.manager.block_manager.num_evictable_blocks


def test_a_fully_cached_prompt_computes_its_last_token_into_a_copy_of_its_last_block():
    prompt = DOC[:16]  # exactly 4 blocks
    eng = engine()
    first = eng.generate([prompt], GREEDY, progress=False)[0]
    bm = eng.manager.block_manager
    hashes = eng.scheduler.prefix_cache.hasher.hash_full_blocks(prompt, 4)
    cached = bm.lookup(hashes)
    assert len(cached) == 4  # the whole prompt is cached
    again = eng.generate([prompt], GREEDY, progress=False)[0]
    assert again.num_cached_tokens == 15 and again.outputs == first.outputs  # 3 blocks + 3 tokens copied
    assert bm.lookup(hashes) == cached  # the 4th block kept its name: the copy written into was not registered
    assert eng.metrics().num_prefill_tokens == 16 + 1
    assert idle_and_clean(eng)


def test_no_stale_hash_after_eviction():
    eng = engine(num_blocks=12, watermark=0.0)  # 48 token slots
    p = DOC[:8]
    want = engine(enable_prefix_caching=False).generate([p], GREEDY, progress=False)
    assert tokens(eng.generate([p], GREEDY, progress=False)) == tokens(want)
    bm, hasher = eng.manager.block_manager, eng.scheduler.prefix_cache.hasher
    assert len(bm.lookup(hasher.hash_full_blocks(p, 4))) == 2
    others = [[200 + i] * 30 for i in range(3)]  # distinct prompts needing most of the pool
    eng.generate(others, SamplingParams(temperature=0, max_tokens=10), progress=False)
    assert bm.num_evictions > 0
    left = bm.lookup(hasher.hash_full_blocks(p, 4))
    again = eng.generate([p], GREEDY, progress=False)[0]
    assert again.num_cached_tokens == 4 * len(left) < 8  # what was evicted is computed again
    assert tokens([again]) == tokens(want)
    assert idle_and_clean(eng)


def test_generated_blocks_are_cached_and_continued_conversations_hit_them():
    eng = engine()
    first = eng.generate([DOC[:10]], SamplingParams(temperature=0, max_tokens=12), progress=False)[0]
    follow_up = DOC[:10] + first.outputs[0].token_ids + [1, 2, 3]  # 25 tokens: the answer's blocks are cached
    out = eng.generate([follow_up], GREEDY, progress=False)[0]
    assert out.num_cached_tokens == 20  # 5 full blocks: 2 prompt + 3 written while decoding (the 21st token is new)
    assert tokens([out]) == tokens(engine(enable_prefix_caching=False).generate([follow_up], GREEDY, progress=False))
    assert idle_and_clean(eng)


def test_parallel_branches_fork_from_a_cached_prefix():
    eng = engine()
    eng.generate([DOC + [1]], GREEDY, progress=False)
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8)
    out = eng.generate([DOC + [9, 9]], params, progress=False)[0]
    assert out.num_cached_tokens == 40 and len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert tokens([out]) == tokens(engine(enable_prefix_caching=False).generate([DOC + [9, 9]], params,
                                                                                 progress=False))
    assert idle_and_clean(eng)


def test_prompt_logprobs_requests_skip_the_lookup():
    eng = engine()
    eng.generate([DOC + [1]], GREEDY, progress=False)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    out = eng.generate([DOC + [5]], params, progress=False)[0]
    assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == 41 and all(out.prompt_logprobs[1:])
    ref = engine(enable_prefix_caching=False).generate([DOC + [5]], params, progress=False)[0]
    for a, b in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
        assert a.keys() == b.keys() and list(a.values()) == pytest.approx(list(b.values()), abs=1e-6)
    assert idle_and_clean(eng)


def shared_prompts(num, seed):
    """Prompts made of a few shared prefixes (whole blocks and not) and private tails."""
    rng = np.random.default_rng(seed)
    heads = [DOC[:int(k)] for k in (8, 13, 40)]
    return [heads[int(rng.integers(3))] + rng.integers(0, 256, int(rng.integers(1, 12))).tolist()
            for _ in range(num)]


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
@pytest.mark.parametrize("pool", [256, 36], ids=["roomy", "preempting"])
def test_outputs_identical_with_caching_and_chunking_on_or_off(pool, chunked, n):
    ps = shared_prompts(12, seed=n)
    params = [SamplingParams(n=n, temperature=0, max_tokens=int(m)) for m in
              np.random.default_rng(5).integers(8, 20, len(ps))]
    ref = tokens(engine(enable_prefix_caching=False, enable_chunked_prefill=False, max_num_batched_tokens=2048)
                 .generate(ps, params, progress=False))
    budget = 8 if chunked else 80
    eng = engine(num_blocks=pool, watermark=0.0, enable_chunked_prefill=chunked, max_model_len=80,
                 max_num_batched_tokens=budget, max_num_seqs=8)
    assert tokens(eng.generate(ps, params, progress=False)) == ref
    assert tokens(eng.generate(ps[::-1], params[::-1], progress=False)) == ref[::-1]  # now mostly cached
    m = eng.metrics()
    assert m.num_prefix_hit_tokens > 0
    if pool == 36:
        assert m.num_preemptions > 0 and m.num_evictions > 0
    assert idle_and_clean(eng)


def test_caching_is_off_in_static_batching_and_on_request():
    static = engine(scheduling="static")
    static.generate([DOC + [1], DOC + [2]], GREEDY, progress=False)
    static.generate([DOC + [3]], GREEDY, progress=False)
    assert static.metrics().num_prefix_hit_tokens == 0 and static.scheduler.prefix_cache is None
    off = engine(enable_prefix_caching=False)
    off.generate([DOC + [1]], GREEDY, progress=False)
    assert off.generate([DOC + [2]], GREEDY, progress=False)[0].num_cached_tokens == 0
    assert idle_and_clean(static) and idle_and_clean(off)
