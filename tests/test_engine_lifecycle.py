"""Engine lifecycle (issue 8): refusal up front, abort, failures that leave nothing behind, release of finished
requests, request ids, metrics timestamps, O(1) validation in n, EngineConfig validation, bf16 on the CPU."""
import contextlib
import signal

import numpy as np
import pytest

from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams
from pagedkv.engine import request as request_module

GREEDY = SamplingParams(temperature=0, max_tokens=6)


def engine(**kwargs):
    kwargs = {"device": "cpu", "block_size": 4, "num_blocks": 256, "seed": 0, **kwargs}
    return LLMEngine(EngineConfig(**kwargs))


@contextlib.contextmanager
def within(seconds: int):
    """Fail (TimeoutError) instead of hanging the test run."""
    def alarm(*_):
        raise TimeoutError(f"did not return within {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def pool_free(eng) -> bool:
    bm = eng.manager.block_manager
    return bm.num_free_blocks == bm.num_blocks and not eng.manager.seq_ids


def run_all(eng) -> dict:
    outs = {}
    with within(20):
        while eng.has_unfinished_requests():
            for o in eng.step():
                assert not outs.get(o.request_id, None) or not outs[o.request_id].finished, "returned twice"
                outs[o.request_id] = o
    return outs


def raising_forward(eng, at_call: int, exc=RuntimeError("boom")):
    """Make the model's forward (prefill or decode) raise on its ``at_call``-th call."""
    calls = [0]
    for name in ("prefill", "decode"):
        real = getattr(eng.model, name)

        def wrapper(*args, _real=real, **kwargs):
            calls[0] += 1
            if calls[0] == at_call:
                raise exc
            return _real(*args, **kwargs)
        setattr(eng.model, name, wrapper)


# -- finding 1: a request that can never be scheduled is refused, it does not hang --------------------------
@pytest.mark.parametrize("scheduling", ["continuous", "static"])
def test_n_above_max_num_seqs_is_refused_not_hung(scheduling):
    eng = LLMEngine(EngineConfig(device="cpu", num_blocks=64, max_model_len=64, max_num_batched_tokens=64,
                                 max_num_seqs=2, scheduling=scheduling))
    with within(10), pytest.raises(ValueError, match="max_num_seqs"):
        eng.generate([[1, 2, 3]], SamplingParams(n=4, max_tokens=3), progress=False)
    assert not eng.has_unfinished_requests() and pool_free(eng)


@pytest.mark.parametrize("prompt_len, params, match", [
    (60, SamplingParams(max_tokens=5), "max_model_len"),
    (65, SamplingParams(max_tokens=1), "max_model_len"),
    (10, SamplingParams(n=2, max_tokens=50), "blocks"),  # 2 x 60 tokens > the pool's 64 x 1 usable slots
])
def test_requests_beyond_the_limits_are_refused(prompt_len, params, match):
    eng = engine(num_blocks=16, max_model_len=64)  # 64 token slots
    with pytest.raises(ValueError, match=match):
        eng.check_request([1] * prompt_len, params)
    with pytest.raises(ValueError, match=match):
        eng.add_request([1] * prompt_len, params)
    assert not eng.has_unfinished_requests()


def test_what_the_engine_keeps_cannot_be_mutated_by_the_caller():
    eng = engine()
    prompt = [5, 6, 7]
    rid = eng.add_request(prompt, GREEDY)
    prompt.extend([1] * 5000)  # the caller's list, not the engine's
    prompt[0] = 255
    with pytest.raises(AttributeError):
        GREEDY.max_tokens = 10**6
    out = run_all(eng)[rid]
    assert out.prompt_token_ids == [5, 6, 7]
    out.prompt_token_ids.append(9)  # outputs are copies too
    assert out.outputs[0].token_ids == engine().generate([[5, 6, 7]], GREEDY, progress=False)[0].outputs[0].token_ids


# -- finding 2: abort, failures inside a step, release of finished requests ---------------------------------
def test_abort_waiting_and_running_requests_frees_their_blocks_at_once():
    eng = engine()
    a = eng.add_request([1, 2, 3, 4, 5], SamplingParams(n=2, temperature=0, max_tokens=20))
    b = eng.add_request([6, 7, 8], GREEDY)
    waiting = eng.abort_request(b)
    assert waiting.finished and [c.finish_reason for c in waiting.outputs] == ["abort"]
    assert waiting.outputs[0].token_ids == []
    eng.step()
    eng.step()
    assert eng.manager.block_manager.num_used_blocks > 0
    out = eng.abort_request(a)
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort", "abort"]
    assert all(len(c.token_ids) == 2 for c in out.outputs)
    assert pool_free(eng) and not eng.has_unfinished_requests()
    assert eng.abort_request(a) is None and eng.abort_request("nope") is None
    assert eng.step() == []


def test_abort_keeps_the_finish_reason_of_branches_that_already_ended():
    params = dict(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    free_run = engine().generate([[9, 9, 9]], SamplingParams(**params), progress=False)[0].outputs
    stop = free_run[0].token_ids[1]  # branch 0 stops at its second token; pick one the others lack early
    assert any(stop not in c.token_ids[:5] for c in free_run[1:])
    eng = engine()
    rid = eng.add_request([9, 9, 9], SamplingParams(**params, stop_token_ids=[stop]))
    for _ in range(4):
        eng.step()
    out = eng.abort_request(rid)
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].token_ids == free_run[0].token_ids[:2]
    assert "abort" in [c.finish_reason for c in out.outputs[1:]]
    assert pool_free(eng)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "interrupt"])
@pytest.mark.parametrize("at_call", [1, 2, 5])
def test_failure_inside_generate_aborts_its_requests_and_leaves_the_engine_usable(exc, at_call):
    eng = engine(num_blocks=32, watermark=0.0)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]
    raising_forward(eng, at_call, exc)
    with within(10), pytest.raises(type(exc)):
        eng.generate(prompts, SamplingParams(n=2, temperature=0, max_tokens=8), progress=False)
    assert pool_free(eng) and not eng.requests and not eng.has_unfinished_requests()
    eng.manager.block_manager.check_invariants()
    got = eng.generate(prompts, GREEDY, progress=False)
    want = engine(num_blocks=32, watermark=0.0).generate(prompts, GREEDY, progress=False)
    assert [o.outputs for o in got] == [o.outputs for o in want]
    assert pool_free(eng) and eng.step() == []


def test_failure_inside_step_aborts_the_requests_it_scheduled_and_reports_them_once():
    eng = engine()
    ids = [eng.add_request(p, GREEDY) for p in ([1, 2, 3], [4, 5])]
    eng.step()
    raising_forward(eng, 1)
    with pytest.raises(RuntimeError, match="boom"):
        eng.step()
    assert pool_free(eng) and not eng.requests
    outs = eng.step()
    assert sorted(o.request_id for o in outs) == sorted(ids)
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert eng.step() == [] and not eng.has_unfinished_requests()
    assert eng.generate([[1, 2, 3]], GREEDY, progress=False)[0].outputs[0].finish_reason == "length"


def test_finished_requests_are_released_once_returned():
    eng = engine()
    ids = [eng.add_request([i + 1, i + 2], SamplingParams(temperature=0, max_tokens=i + 1)) for i in range(4)]
    seen_finished = []
    with within(20):
        while eng.has_unfinished_requests():
            outs = eng.step()
            for o in outs:
                assert o.request_id not in seen_finished
                if o.finished:
                    seen_finished.append(o.request_id)
                    assert o.request_id not in eng.requests
            assert len(eng.requests) == len(ids) - len(seen_finished)
    assert sorted(seen_finished) == sorted(ids) and not eng.requests
    assert all(eng.abort_request(i) is None for i in ids)
    assert pool_free(eng)


def test_every_advanced_request_is_in_the_step_output():
    eng = engine(max_num_seqs=2)
    ids = [eng.add_request([3, i + 1], SamplingParams(temperature=0, max_tokens=3)) for i in range(3)]
    first = eng.step()
    assert sorted(o.request_id for o in first) == ids[:2]  # the third waits for a seat
    assert all(len(o.outputs[0].token_ids) == 1 and not o.finished for o in first)
    outs = run_all(eng)
    assert all(len(outs[i].outputs[0].token_ids) == 3 for i in ids)


def test_outputs_of_other_callers_advanced_inside_generate_are_reported_by_the_next_step():
    eng = engine()
    other = eng.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=2))
    eng.generate([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=6), progress=False)
    outs = eng.step()
    assert [o.request_id for o in outs] == [other] and outs[0].finished
    assert len(outs[0].outputs[0].token_ids) == 2 and not eng.requests


# -- validation O(1) in n -----------------------------------------------------------------------------------
def test_huge_n_is_refused_and_large_n_accepted_without_building_branches(monkeypatch):
    built = [0]

    class CountingBranch(request_module.Branch):
        __slots__ = ()

        def __init__(self, *args, **kwargs):
            built[0] += 1
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(request_module, "Branch", CountingBranch)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=10**6)
    eng = engine(num_blocks=4200, max_num_seqs=1024, max_num_batched_tokens=1024, max_model_len=16)
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine(max_num_seqs=8).add_request([1, 2, 3], SamplingParams(n=1000))
    assert built[0] == 0
    rid = eng.add_request([1, 2, 3], SamplingParams(n=1024, temperature=0, max_tokens=2))
    assert built[0] == 0  # branches are made when the request is admitted
    out = run_all(eng)[rid]
    assert len(out.outputs) == 1024 and all(len(c.token_ids) == 2 for c in out.outputs)
    assert pool_free(eng)


# -- EngineConfig -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"num_blocks": 0}, "num_blocks"), ({"num_blocks": -3}, "num_blocks"), ({"num_blocks": 2.0}, "num_blocks"),
    ({"num_blocks": True}, "num_blocks"), ({"block_size": 0}, "block_size"), ({"block_size": "16"}, "block_size"),
    ({"kv_memory_bytes": 0}, "kv_memory_bytes"), ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": -1}, "max_num_batched_tokens"), ({"max_model_len": 0}, "max_model_len"),
    ({"max_model_len": 1.5}, "max_model_len"), ({"dtype": "int8"}, "dtype"), ({"device": "tpu"}, "device"),
    ({"seed": -1}, "seed"), ({"seed": "x"}, "seed"), ({"watermark": 1.0}, "watermark"),
    ({"watermark": float("nan")}, "watermark"), ({"scheduling": "dynamic"}, "scheduling"),
    ({"static_padding": "yes"}, "static_padding"), ({"record_steps": 1}, "record_steps"),
    ({"fused": None}, "fused"), ({"cuda_graph": "on"}, "cuda_graph"), ({"eos_token_id": -1}, "eos_token_id"),
    ({"eos_token_id": [1, True]}, "eos_token_id"), ({"eos_token_id": "2"}, "eos_token_id"),
    ({"model": "huge"}, "model"), ({"model": 3}, "model"),
    ({"num_blocks": 4, "kv_memory_bytes": 1 << 20}, "not both"),
    ({"max_num_seqs": 300, "max_num_batched_tokens": 256}, "max_num_seqs"),
])
def test_engine_config_validates_every_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_max_model_len_defaults_to_the_model_bounded_by_the_pool():
    assert engine(num_blocks=16).max_model_len == 64 - 0  # 16 blocks x 4 slots (watermark 0 blocks)
    assert engine(num_blocks=1000).max_model_len == 1024  # the tiny preset's max positions
    with pytest.raises(ValueError, match="max_model_len"):
        engine(num_blocks=16, max_model_len=100)  # could never hold one such sequence
    with pytest.raises(ValueError, match="max_model_len"):
        engine(num_blocks=1000, max_model_len=2000)  # beyond the model's positions


def test_eos_is_a_set_of_ids():
    first = engine().generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                              progress=False)[0].outputs[0].token_ids
    eng = engine(eos_token_id=(250, first[2], first[4]))
    assert eng.eos_token_ids == frozenset({250, first[2], first[4]})
    out = eng.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8), progress=False)[0].outputs[0]
    assert out.token_ids == first[:3] and out.finish_reason == "stop" and out.stop_reason is None


# -- finding 5: bfloat16 (and float16) on the CPU -----------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_the_cpu_works_end_to_end(dtype):
    eng = engine(dtype=dtype)
    assert str(eng.model.dtype) == dtype and str(eng.kv_cache.dtype) == dtype
    outs = eng.generate([[1, 2, 3], [4, 5, 6, 7, 8]], SamplingParams(n=2, temperature=0, max_tokens=6),
                        progress=False)
    for o in outs:
        assert all(len(c.token_ids) == 6 and all(0 <= t < 256 for t in c.token_ids) for c in o.outputs)
    assert pool_free(eng) and not eng.requests


# -- request ids, check_request, metrics ----------------------------------------------------------------------
def test_request_ids_caller_given_or_generated_and_unique_while_live():
    eng = engine()
    assert eng.add_request([1, 2], GREEDY, request_id="chat-1") == "chat-1"
    assert eng.add_request([1, 2], GREEDY, request_id=1) == 1
    auto = [eng.add_request([1, 2], GREEDY) for _ in range(3)]
    assert len(set(auto) | {1, "chat-1"}) == 5
    for bad, match in (("chat-1", "already"), (1, "already"), (True, "request_id"), ([1], "request_id"),
                       (2.5, "request_id")):
        with pytest.raises(ValueError, match=match):
            eng.add_request([1, 2], GREEDY, request_id=bad)
    outs = run_all(eng)
    assert set(outs) == {"chat-1", 1, *auto}
    assert eng.add_request([3], GREEDY, request_id="chat-1") == "chat-1"  # released: the id is free again


def test_check_request_raises_what_add_request_raises_and_changes_nothing():
    eng = engine()
    eng.add_request([1, 2, 3], GREEDY)
    eng.step()
    before = (len(eng.requests), eng.manager.snapshot())
    for prompt, params in (([], GREEDY), ([300], GREEDY), ([1], SamplingParams(stop=["x"])),
                           ([1], "greedy"), ([1] * 2000, GREEDY)):
        with pytest.raises(ValueError) as a:
            eng.check_request(prompt, params)
        with pytest.raises(ValueError) as b:
            eng.add_request(prompt, params)
        assert str(a.value) == str(b.value)
    eng.check_request([1, 2], GREEDY)
    assert (len(eng.requests), eng.manager.snapshot()) == before


def test_request_metrics_timestamps_are_ordered():
    eng = engine(max_num_seqs=1)
    ids = [eng.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=3)) for _ in range(2)]
    outs = run_all(eng)
    for i in ids:
        m = outs[i].metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time
        assert m.last_token_time <= m.finished_time
    assert outs[ids[1]].metrics.first_scheduled_time >= outs[ids[0]].metrics.finished_time  # one seat
    assert np.isfinite(outs[ids[0]].metrics.arrival_time)
