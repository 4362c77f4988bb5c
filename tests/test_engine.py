"""LLMEngine on the CPU (tiny model, float32): preemption, static vs continuous, parallel sampling, bad input."""
import numpy as np
import pytest

from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def engine(**kwargs):
    kwargs = {"device": "cpu", "block_size": 4, "num_blocks": 256, "seed": 0, **kwargs}
    return LLMEngine(EngineConfig(**kwargs))


def prompts(num=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(rng.integers(3, 20))).tolist() for _ in range(num)]


def tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_tiny_pool_preempts_and_gives_the_same_greedy_outputs():
    ps = prompts()
    big = engine(num_blocks=512)
    ref = tokens(big.generate(ps, GREEDY, progress=False))
    assert big.metrics().num_preemptions == 0
    small = engine(num_blocks=12, watermark=0.0)  # 48 token slots for 8 requests of up to 31 tokens
    assert tokens(small.generate(ps, GREEDY, progress=False)) == ref
    assert small.metrics().num_preemptions > 0
    assert small.manager.block_manager.num_free_blocks == 12  # everything was freed


def test_preempted_parallel_requests_recompute_their_branches():
    ps = prompts(6, seed=3)
    params = SamplingParams(n=2, temperature=0, max_tokens=10)
    ref = tokens(engine(num_blocks=512).generate(ps, params, progress=False))
    small = engine(num_blocks=16, watermark=0.0)
    assert tokens(small.generate(ps, params, progress=False)) == ref
    assert small.metrics().num_preemptions > 0


def test_continuous_and_static_batching_agree():
    ps = prompts(10, seed=1)
    params = [SamplingParams(temperature=0, max_tokens=int(m)) for m in np.random.default_rng(2).integers(1, 15, 10)]
    cont = engine(max_num_seqs=4)
    static = engine(max_num_seqs=4, scheduling="static", record_steps=True)
    assert tokens(cont.generate(ps, params, progress=False)) == tokens(static.generate(ps, params, progress=False))
    # static batches reserve prompt + max_tokens up front: slots reserved exceed slots filled
    assert min(m.utilization for m in static.step_metrics if m.num_running) < 0.8
    assert static.manager.block_manager.num_free_blocks == 256


def test_static_batches_run_until_the_longest_finishes():
    eng = engine(max_num_seqs=2, scheduling="static", record_steps=True)
    eng.generate([[1, 2, 3], [4, 5, 6], [7, 8]], [SamplingParams(temperature=0, max_tokens=m) for m in (2, 6, 3)],
                 progress=False)
    prefill_steps = [m.step for m in eng.step_metrics if m.num_prefill_tokens]
    assert prefill_steps == [1, 7]  # the third request waits for the whole first batch (6 tokens)


@pytest.mark.parametrize("padding", [True, False])
def test_static_reservations_padded_to_the_batch_longest_or_own_length(padding):
    # block_size 4: request A needs 4 + 4 = 8 tokens (2 blocks), B 4 + 20 = 24 tokens (6 blocks)
    eng = engine(num_blocks=10, scheduling="static", static_padding=padding, record_steps=True)
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (4, 20)]
    eng.add_request([1, 2, 3, 4], params[0])
    eng.add_request([5, 6, 7, 8], params[1])
    eng.step()
    first = eng.step_metrics[0]
    if padding:  # A padded to B's 24 tokens: 6 + 6 = 12 blocks > 10, so B waits for the next batch
        assert (first.num_running, first.num_used_blocks) == (1, 2)
    else:  # 2 + 6 = 8 blocks: both run at once
        assert (first.num_running, first.num_used_blocks) == (2, 8)
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.manager.block_manager.num_free_blocks == 10
    assert tokens(eng.generate([[1, 2, 3, 4], [5, 6, 7, 8]], params, progress=False)) == \
        tokens(engine().generate([[1, 2, 3, 4], [5, 6, 7, 8]], params, progress=False))


def test_padded_static_batch_reserves_the_longest_for_every_request():
    eng = engine(num_blocks=64, scheduling="static", record_steps=True)
    eng.generate([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12]], [SamplingParams(temperature=0, max_tokens=m)
                                                                for m in (2, 11)], progress=False)
    # longest = 9 + 11 = 20 tokens = 5 blocks of 4, reserved by both requests
    assert eng.step_metrics[0].num_used_blocks == 10


def test_parallel_greedy_branches_are_identical_and_share_the_prompt():
    eng = engine()
    prompt = list(range(1, 9))  # two full blocks of 4
    rid = eng.add_request(prompt, SamplingParams(n=3, temperature=0, max_tokens=6))
    eng.step()
    req = eng.requests[rid]
    tables = [eng.manager.block_table(b.seq_id) for b in req.branches]
    assert all(eng.manager.block_manager.ref_count(blk) == 3 for blk in tables[0][:2])
    while eng.has_unfinished_requests():
        eng.step()
    outs = req.output().outputs
    assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids
    assert eng.metrics().num_cow_copies == 0  # full prompt blocks are never written again
    single = engine().generate([prompt], SamplingParams(temperature=0, max_tokens=6), progress=False)
    assert single[0].outputs[0].token_ids == outs[0].token_ids


def test_copy_on_write_only_for_the_shared_partial_block():
    eng = engine()
    rid = eng.add_request(list(range(1, 7)), SamplingParams(n=3, temperature=0, max_tokens=5))  # 1.5 blocks
    eng.step()
    req = eng.requests[rid]
    first = eng.manager.block_table(req.branches[0].seq_id)
    assert [eng.manager.block_manager.ref_count(b) for b in first] == [3, 3]
    eng.step()  # every branch appends into the shared partial block
    assert eng.manager.num_cow_copies == 2  # the last writer owns the old block
    assert eng.manager.block_manager.ref_count(first[0]) == 3


def test_seeded_sampling_is_reproducible():
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, seed=11, max_tokens=10)
    a = tokens(engine().generate([[5, 6, 7]], params, progress=False))
    b = tokens(engine().generate([[5, 6, 7]], params, progress=False))
    assert a == b
    assert len({tuple(t) for t in a[0]}) > 1  # branches differ


def test_stop_tokens_and_eos():
    eng = engine(eos_token_id=None)
    first = eng.generate([[1, 2, 3]], GREEDY, progress=False)[0].outputs[0].token_ids
    out = engine().generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[first[2]]),
                            progress=False)[0].outputs[0]
    assert out.token_ids == first[:3] and out.finish_reason == "stop"
    eos = engine(eos_token_id=first[1])
    assert eos.generate([[1, 2, 3]], GREEDY, progress=False)[0].outputs[0].token_ids == first[:2]
    ignore = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert eos.generate([[1, 2, 3]], ignore, progress=False)[0].outputs[0].token_ids == first


@pytest.mark.parametrize("prompt, params, match", [
    ([], GREEDY, "non-empty"),
    ([1, 256], GREEDY, "outside the vocabulary"),
    ([1, -1], GREEDY, "outside the vocabulary"),
    ([1.5, 2.0], GREEDY, "ints"),
    ([1] * 2040, GREEDY, "max_model_len"),
    ([1] * 100, SamplingParams(n=20, max_tokens=100), "usable blocks"),
    ([1, 2], "greedy", "SamplingParams"),
])
def test_bad_requests_are_refused_without_disturbing_running_ones(prompt, params, match):
    eng = engine()
    rid = eng.add_request([4, 5, 6], GREEDY)
    eng.step()
    eng.step()
    before = (list(eng.scheduler.waiting), list(eng.scheduler.running), eng.manager.snapshot())
    with pytest.raises(ValueError, match=match):
        eng.add_request(prompt, params)
    with pytest.raises(ValueError, match=match):
        eng.generate([[7, 8], prompt], [GREEDY, params], progress=False)
    assert (list(eng.scheduler.waiting), list(eng.scheduler.running), eng.manager.snapshot()) == before
    final = {}
    while eng.has_unfinished_requests():
        final.update((o.request_id, o) for o in eng.step())
    alone = engine().generate([[4, 5, 6]], GREEDY, progress=False)
    assert final[rid].outputs == alone[0].outputs and rid not in eng.requests  # released once returned


def test_bad_sampling_params_and_config():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="not both"):
        EngineConfig(num_blocks=4, kv_memory_bytes=1 << 20)
    with pytest.raises(ValueError, match="scheduling"):
        EngineConfig(scheduling="dynamic")


def test_kv_memory_budget_and_step_metrics():
    eng = engine(num_blocks=None, kv_memory_bytes=1 << 20, record_steps=True)
    per_block = eng.kv_cache.bytes_per_block
    assert eng.kv_cache.num_blocks == (1 << 20) // per_block
    eng.generate(prompts(4), GREEDY, progress=False)
    m = eng.step_metrics
    assert [s.step for s in m] == list(range(1, len(m) + 1))
    assert all(s.num_token_slots_used <= s.num_token_slots_reserved for s in m)
    assert m[0].num_prefill_tokens > 0 and m[1].num_decode_tokens == 4
    assert eng.metrics().num_generated_tokens == 4 * 12


def test_filled_token_slots_count_cached_tokens_only():
    eng = engine(block_size=8)
    for p in prompts(5, seed=4):
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=9))
    while eng.has_unfinished_requests():
        eng.step()
        cached = sum(len(r.prompt_token_ids) + len(b.output_token_ids) - 1
                     for r in eng.scheduler.running for b in r.active_branches())
        assert eng.metrics().num_token_slots_used == cached
    assert eng.metrics().num_used_blocks == 0
