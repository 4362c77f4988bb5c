"""Asynchronous scheduling (issue 11): each step call launches step N+1 before it retires step N. Outputs are
the synchronous engine's (greedy and seeded sampling; preemption, n > 1, chunked prefill, prefix caching,
static batches, stop tokens, logprobs), and the overlap's edge cases: a branch that ends on step N (a value-
dependent end) is already in step N+1 but gets no step N+1 token; length ends are known in time (no wasted row);
aborts while a step is in flight; failures while launching or retiring leave no blocks behind."""
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams
from pagedkv.engine.request import PLACEHOLDER
from pagedkv.model import ModelConfig

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def engine(asynchronous: bool, **kwargs):
    kwargs = {"device": "cpu", "block_size": 4, "num_blocks": 256, "seed": 0, **kwargs}
    return LLMEngine(EngineConfig(async_scheduling=asynchronous, **kwargs))


def prompts(num=8, seed=0, shared=0):
    rng = np.random.default_rng(seed)
    doc = rng.integers(0, 256, shared).tolist()
    return [doc + rng.integers(0, 256, size=int(rng.integers(3, 20))).tolist() for _ in range(num)]


def full(outs):
    """Everything an output carries but timestamps."""
    return [(o.finished, o.prompt_logprobs, o.num_cached_tokens,
             [(c.index, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs, c.cumulative_logprob)
              for c in o.outputs]) for o in outs]


def tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def pool_free(eng) -> bool:
    bm = eng.manager.block_manager
    return bm.num_free_blocks == bm.num_blocks and not eng.manager.seq_ids


def launched_rows(eng) -> list:
    """Record every launched step's scheduled (request id, branch index, start) rows."""
    log, launch = [], eng.runner.launch

    def spy(out):
        log.append([(s.request.request_id, s.branch.index, s.start) for s in out.seqs])
        return launch(out)
    eng.runner.launch = spy
    return log


CASES = {
    "greedy": (dict(), GREEDY),
    "preempting": (dict(num_blocks=12, watermark=0.0), GREEDY),
    "n=2 preempting": (dict(num_blocks=24, watermark=0.0), SamplingParams(n=2, temperature=0, max_tokens=10)),
    "chunked sampled": (dict(max_num_batched_tokens=8, max_num_seqs=4),
                        SamplingParams(n=3, temperature=0.8, top_p=0.9, seed=3, max_tokens=10)),
    "eos": (dict(eos_token_id=[5, 77, 200, 13, 101]), SamplingParams(temperature=0, max_tokens=30)),
    "static": (dict(scheduling="static", max_num_seqs=3), SamplingParams(temperature=1.0, seed=7, max_tokens=9)),
    "eos preempting logprobs": (dict(num_blocks=30, watermark=0.0, eos_token_id=[5, 77, 200, 13]),
                                SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=20, logprobs=2)),
    "stop ids, prompt logprobs": (dict(max_num_batched_tokens=16, max_num_seqs=4),
                                  SamplingParams(temperature=0.7, top_k=20, seed=9, max_tokens=14,
                                                 stop_token_ids=[3, 50, 99], prompt_logprobs=1)),
    "min_p no caching": (dict(enable_prefix_caching=False, num_blocks=26, watermark=0.0),
                         SamplingParams(n=2, temperature=1.0, min_p=0.05, seed=2, max_tokens=12)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_async_outputs_equal_the_synchronous_engine(case):
    kwargs, params = CASES[case]
    ps = prompts(8, seed=1, shared=9)  # shared prefixes: the second pass hits the prefix cache
    sync, asy = engine(False, **kwargs), engine(True, **kwargs)
    want = full(sync.generate(ps, params, progress=False) + sync.generate(ps, params, progress=False))
    got = full(asy.generate(ps, params, progress=False) + asy.generate(ps, params, progress=False))
    assert got == want
    assert pool_free(sync) and pool_free(asy) and not asy.requests
    if case == "greedy":  # no value-dependent end: the very same steps
        assert asy.totals.num_steps == sync.totals.num_steps


def test_length_ends_are_known_in_time_so_every_launched_row_is_needed():
    ps = prompts(6, seed=2)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 2, 3, 5, 8, 13)]
    sync, asy = engine(False, max_num_seqs=4), engine(True, max_num_seqs=4)
    rows_sync, rows_async = launched_rows(sync), launched_rows(asy)
    assert full(asy.generate(ps, params, progress=False)) == full(sync.generate(ps, params, progress=False))
    assert rows_async == rows_sync  # the same schedule, step by step


def test_a_branch_that_ends_on_step_n_gets_no_token_of_step_n_plus_1():
    free = engine(False).generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                                  progress=False)[0].outputs[0].token_ids
    eos = free[3]
    assert eos not in free[:3]
    eng = engine(True, eos_token_id=eos)
    rows = launched_rows(eng)
    a = eng.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=10))
    b = eng.add_request([7, 7], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))  # keeps running
    reports = []
    while eng.has_unfinished_requests():
        reports += [o for o in eng.step() if o.request_id == a]
    out = reports[-1].outputs[0]
    assert out.token_ids == free[:4] and out.finish_reason == "stop"
    assert [o.finished for o in reports] == [False] * 3 + [True]  # reported once finished, never again
    # the prefill sampled token 0; decode steps fed tokens 0..3; the step feeding token 3 (the EOS) was launched
    # before the EOS was read back: it ran, and its token was dropped
    assert [start for step in rows for rid, _, start in step if rid == a] == [0, 3, 4, 5, 6]
    assert pool_free(eng) and eng.step() == []


def test_a_stop_token_end_on_step_n_leaves_the_other_branches_running():
    params = dict(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    free = engine(False).generate([[9, 9, 9]], SamplingParams(**params), progress=False)[0].outputs
    stop = free[0].token_ids[1]
    want = engine(False).generate([[9, 9, 9]], SamplingParams(**params, stop_token_ids=[stop]), progress=False)
    got = engine(True).generate([[9, 9, 9]], SamplingParams(**params, stop_token_ids=[stop]), progress=False)
    assert full(got) == full(want)
    assert got[0].outputs[0].token_ids == free[0].token_ids[:2] and got[0].outputs[0].stop_reason == stop


@pytest.mark.parametrize("abort_after", [1, 2, 3, 5])
def test_abort_while_a_step_is_in_flight(abort_after):
    eng, ref = engine(True), engine(False)
    ps = prompts(3, seed=4)
    params = SamplingParams(n=2, temperature=0.9, seed=8, max_tokens=10)
    ids = [eng.add_request(p, params) for p in ps]
    seen = {}
    for _ in range(abort_after):
        for o in eng.step():
            seen[o.request_id] = o
    assert eng._inflight is not None  # the next step runs while we abort
    out = eng.abort_request(ids[1])
    assert out.finished and all(c.finish_reason == "abort" for c in out.outputs)
    assert all(PLACEHOLDER not in c.token_ids for c in out.outputs)
    before = seen[ids[1]].outputs if ids[1] in seen else None
    assert [c.token_ids for c in out.outputs] == ([c.token_ids for c in before] if before else [[], []])
    while eng.has_unfinished_requests():
        for o in eng.step():
            assert o.request_id != ids[1], "an aborted request was reported after its abort"
            seen[o.request_id] = o
    want = ref.generate([ps[0], ps[2]], params, progress=False)
    assert full([seen[ids[0]], seen[ids[2]]]) == full(want)
    assert pool_free(eng) and not eng.requests and eng.step() == []


def test_aborting_everything_leaves_nothing_to_run():
    eng = engine(True)
    ids = [eng.add_request(p, GREEDY) for p in prompts(3)]
    eng.step()
    for i in ids:
        eng.abort_request(i)
    assert pool_free(eng) and not eng.has_unfinished_requests()
    assert eng.step() == [] and eng._inflight is None  # the stale step in flight is retired, nothing reported


def raising(eng, name: str, at_call: int, exc):
    calls, real = [0], getattr(eng.runner, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at_call:
            raise exc
        return real(*args, **kwargs)
    setattr(eng.runner, name, wrapper)


@pytest.mark.parametrize("where", ["launch", "wait"])
@pytest.mark.parametrize("at_call", [1, 2, 3, 6])
def test_a_failure_while_launching_or_retiring_leaves_no_blocks_behind(where, at_call):
    eng = engine(True, num_blocks=40, watermark=0.0)
    ps = prompts(4, seed=5)
    params = SamplingParams(n=2, temperature=0, max_tokens=8)
    ids = [eng.add_request(p, params) for p in ps]
    raising(eng, where, at_call, RuntimeError("boom"))
    finals, failures = {}, 0
    for _ in range(100):
        if not eng.has_unfinished_requests():
            break
        try:
            outs = eng.step()
        except RuntimeError:
            failures += 1
            continue
        for o in outs:
            assert o.request_id not in finals, "a finished request was reported twice"
            if o.finished:
                finals[o.request_id] = o
    assert failures == 1 and sorted(finals) == sorted(ids)
    assert any(c.finish_reason == "abort" for o in finals.values() for c in o.outputs)
    assert pool_free(eng) and not eng.requests
    eng.manager.block_manager.check_invariants()
    assert tokens(eng.generate(ps, params, progress=False)) == tokens(engine(False).generate(ps, params, progress=False))


def test_a_failure_inside_generate_aborts_its_requests_with_a_step_in_flight():
    eng = engine(True)
    raising(eng, "launch", 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        eng.generate(prompts(3), GREEDY, progress=False)
    assert pool_free(eng) and not eng.requests and not eng.has_unfinished_requests()
    got = eng.generate(prompts(3), GREEDY, progress=False)
    assert tokens(got) == tokens(engine(False).generate(prompts(3), GREEDY, progress=False))


def test_outputs_never_show_a_token_in_flight():
    eng = engine(True)
    ids = [eng.add_request(p, SamplingParams(n=2, temperature=0, max_tokens=7)) for p in prompts(3)]
    final = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            assert all(PLACEHOLDER not in c.token_ids for c in o.outputs)
            final[o.request_id] = o
    for i in ids:
        assert all(len(c.token_ids) == 7 for c in final[i].outputs)
    assert pool_free(eng)


# -- Hypothesis: asynchronous == synchronous over random configs and requests ---------------------------------
MICRO = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                    intermediate_size=32, max_position_embeddings=256)
configs = st.fixed_dictionaries({
    "block_size": st.sampled_from([1, 2, 4, 8]),
    "num_blocks": st.integers(24, 200),
    "max_num_seqs": st.integers(1, 6),
    "extra_budget": st.integers(0, 40),
    "scheduling": st.sampled_from(["continuous", "continuous", "static"]),
    "enable_chunked_prefill": st.booleans(),
    "enable_prefix_caching": st.booleans(),
    "eos_token_id": st.sampled_from([None, 3, (5, 17)]),
})
# (shared prefix, own tokens, n, max_tokens, temperature, stop token)
requests = st.lists(st.tuples(st.integers(0, 24), st.integers(1, 12), st.integers(1, 3), st.integers(1, 12),
                              st.sampled_from([0.0, 0.0, 1.0]), st.sampled_from([None, 7, 30])),
                    min_size=1, max_size=7)


@settings(max_examples=max(10, settings().max_examples // 4), deadline=None)
@given(config=configs, reqs=requests)
def test_async_equals_sync_on_random_workloads(config, reqs):
    kwargs = dict(config)
    kwargs["max_num_batched_tokens"] = kwargs["max_num_seqs"] + kwargs.pop("extra_budget")
    try:
        sync = LLMEngine(EngineConfig(model=MICRO, device="cpu", async_scheduling=False, watermark=0.0, **kwargs))
    except ValueError:
        return
    asy = LLMEngine(EngineConfig(model=MICRO, device="cpu", async_scheduling=True, watermark=0.0, **kwargs))
    shared = [(11 * j + 3) % 64 for j in range(24)]
    ps, params = [], []
    for i, (pre, own, n, max_tokens, temperature, stop) in enumerate(reqs):
        p = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, seed=i,
                           stop_token_ids=() if stop is None else (stop,))
        prompt = shared[:pre] + [(i * 5 + j) % 64 for j in range(own)]
        try:
            sync.check_request(prompt, p)
        except ValueError:
            continue
        ps.append(prompt)
        params.append(p)
    if not ps:
        return
    event(f"{len(ps)} requests")
    assert full(asy.generate(ps, params, progress=False)) == full(sync.generate(ps, params, progress=False))
    assert pool_free(asy) or asy.manager.block_manager.num_evictable_blocks
    asy.manager.block_manager.check_invariants()
    assert not asy.manager.seq_ids and not asy.requests and not asy.has_unfinished_requests()
