"""vLLM's logits processors (penalties, logit_bias, bad_words, allowed_token_ids, min_tokens): the device kernel
and its NumPy twin against the float64 reference of vLLM's semantics; the engine's outputs against the same
reference, row by row; per-row counts kept on the device."""
import re
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pagedkv.engine.runner.model_runner as model_runner
from pagedkv.engine import EngineConfig, LLMEngine
from pagedkv.engine.runner.logits_process import (COUNT_MASK, HISTORY, MASK, PROCESS, PROMPT_BIT, STATE, UPDATE, LogitsState,
                                           allowed_bitmask, count_tokens, process_row, request_words)
from pagedkv.engine.runner.logits_reference import process_reference
from pagedkv.engine.runner.sampler import SamplingTensors, sample
from pagedkv.sampling_params import SamplingParams

VOCAB = 97


def _close(got, ref):
    got = np.asarray(got, dtype=np.float64)
    assert np.array_equal(np.isneginf(got), np.isneginf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=2e-6, atol=2e-6)


def _state(params, prompt, outputs, stop_ids=(), bad=(), xp=np, vocab=VOCAB, row=1, sampled=None, srcs=None):
    state = LogitsState(vocab, 4, xp)
    state.ensure(4)
    words = request_words(params, vocab, stop_ids, [list(w) for w in bad])
    srcs = [-1] * len(outputs) if srcs is None else srcs
    sampled = xp.zeros(8, dtype=np.int32) if sampled is None else sampled
    state.init_row(row, words, prompt, outputs, srcs, params.allowed_token_ids, sampled)
    return state


penalties = st.fixed_dictionaries({
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.sampled_from([1.0, 0.5, 1.1, 1.3, 2.0]), "min_tokens": st.integers(0, 6),
    "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100), max_size=6),
    "allowed_token_ids": st.one_of(st.none(), st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40)),
})


@settings(max_examples=120, deadline=None)
@given(kw=penalties, seed=st.integers(0, 2**32 - 1), num_out=st.integers(0, 40),
       bad=st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=4), max_size=4))
def test_numpy_processing_equals_the_float64_reference(kw, seed, num_out, bad):
    rng = np.random.default_rng(seed)
    params = SamplingParams(**kw, max_tokens=64)
    prompt = rng.integers(0, VOCAB, int(rng.integers(1, 30))).tolist()
    outputs = rng.integers(0, 10, num_out).tolist()  # small ids: repeats and bad-word matches are frequent
    logits = (rng.standard_normal(VOCAB) * 4).astype(np.float32)
    stop = [3, 5]
    state = _state(params, prompt, outputs, stop, bad)
    got = process_row(logits, state, PROCESS | STATE, 1, -1, len(outputs))
    _close(got, process_reference(logits, params, prompt, outputs, stop, bad))


def test_repetition_divides_positive_and_multiplies_negative_logits():
    params = SamplingParams(repetition_penalty=2.0)
    logits = np.array([4.0, -4.0, 4.0, -4.0, 1.0], dtype=np.float32)
    got = process_row(logits, _state(params, [0], [1], vocab=5), PROCESS | STATE, 1, -1, 1)
    np.testing.assert_array_equal(got, [2.0, -8.0, 4.0, -4.0, 1.0])  # prompt token 0, output token 1


def test_frequency_and_presence_count_output_tokens_only():
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    logits = np.zeros(5, dtype=np.float32)
    got = process_row(logits, _state(params, [0, 0, 4], [2, 2, 2, 3], vocab=5), PROCESS | STATE, 1, -1, 4)
    np.testing.assert_array_equal(got, [0.0, 0.0, -2.5, -1.5, 0.0])


def test_bad_words_ban_the_last_token_after_their_prefix():
    params = SamplingParams(bad_words=["x"])  # the token ids below stand for the tokenized words
    logits = np.zeros(10, dtype=np.float32)
    bad = [[7], [1, 2, 3]]
    for outputs, banned in (([5, 1, 2], {7, 3}), ([1, 2, 5], {7}), ([], {7})):
        got = process_row(logits, _state(params, [0], outputs, bad=bad, vocab=10), PROCESS | STATE, 1, -1,
                          len(outputs))
        assert set(np.flatnonzero(np.isneginf(got))) == banned


def test_min_tokens_masks_stop_ids_until_reached():
    params = SamplingParams(min_tokens=2, logit_bias={4: 5.0})
    logits = np.zeros(6, dtype=np.float32)
    for outputs, masked in (([], True), ([1], True), ([1, 2], False)):
        got = process_row(logits, _state(params, [0], outputs, stop_ids=[4, 5], vocab=6), PROCESS | STATE, 1, -1,
                          len(outputs))
        assert np.isneginf(got[[4, 5]]).all() == masked and (got[4] == 5.0) == (not masked)


def test_a_token_in_flight_is_counted_from_the_sampled_buffer():
    params = SamplingParams(frequency_penalty=1.0)
    sampled = np.array([0, 0, 0, 6, 0], dtype=np.int32)
    state = _state(params, [0], [6, 0], vocab=8, sampled=sampled, srcs=[-1, 3])  # output 1 in flight: token 6
    assert state.counts[1, 6] == 2 and list(state.history[1, :2]) == [6, 6]


def test_count_tokens_adds_sampled_tokens_and_keeps_the_history_ring():
    state = _state(SamplingParams(presence_penalty=1.0), [0], [], vocab=8)
    t = SamplingTensors.allocate(3)
    t.flags[:] = [UPDATE | STATE | PROCESS, 0, STATE | PROCESS]  # only row 0 counts its token
    t.state_row[:] = 1
    tokens = [(3 * step) % 8 for step in range(HISTORY + 3)]
    for step, token in enumerate(tokens):
        t.step[:] = step
        count_tokens(np.array([token, 7, 7], dtype=np.int32), t, state)
    np.testing.assert_array_equal(state.counts[1] & COUNT_MASK, np.bincount(tokens, minlength=8))
    assert state.counts[1, 0] & PROMPT_BIT and not state.counts[1, 1] & PROMPT_BIT
    assert [state.history[1, j % HISTORY] for j in range(3, HISTORY + 3)] == tokens[3:]


def test_grammar_and_allowed_masks_combine():
    params = SamplingParams(allowed_token_ids=[1, 2, 3])
    state = _state(params, [0], [], vocab=40)
    state.grammar[0] = allowed_bitmask([2, 3, 35], 40)
    got = process_row(np.ones(40, dtype=np.float32), state, PROCESS | STATE | MASK, 1, 0, 0)
    assert list(np.flatnonzero(np.isfinite(got))) == [2, 3]


def test_sample_with_state_draws_from_the_processed_row():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, VOCAB)).astype(np.float32)
    params = SamplingParams(temperature=0, logit_bias={int(np.argmin(logits[1])): 100.0})
    state = _state(params, [0], [])
    t = SamplingTensors.allocate(3)
    t.flags[1], t.state_row[1], t.proc_row[1] = PROCESS | STATE, 1, 0
    out = sample(logits, t, state=state)
    assert out.tolist() == [int(np.argmax(logits[0])), int(np.argmin(logits[1])), int(np.argmax(logits[2]))]


@pytest.mark.parametrize("kwargs, match", [
    ({"logit_bias": {VOCAB: 1.0}}, "logit_bias token id"), ({"allowed_token_ids": [VOCAB + 3]}, "allowed_token_ids"),
])
def test_request_words_refuse_ids_outside_the_vocabulary(kwargs, match):
    with pytest.raises(ValueError, match=match):
        request_words(SamplingParams(**kwargs), VOCAB, (), [])


def test_request_words_refuse_too_long_bad_words():
    with pytest.raises(ValueError, match="bad_words"):
        request_words(SamplingParams(), VOCAB, (), [[1] * (HISTORY + 2)])


# ---- the engine: every processed row's token is the reference's argmax ------------------------------------

def _engine(**kwargs):
    kwargs = {"device": "cpu", "block_size": 4, "num_blocks": 256, "seed": 0, "async_scheduling": False, **kwargs}
    return LLMEngine(EngineConfig(**kwargs))


def _recording(monkeypatch):
    """Events in order: ("init", state row, request, branch) and ("sample", logits, flags, steps, rows, tokens)."""
    events = []
    real_sample, real_init = model_runner.sample, model_runner.ModelRunner._init_state_row

    def spy_sample(logits, tensors, out=None, **kw):
        result = real_sample(logits, tensors, out=out, **kw)
        n = logits.shape[0]
        events.append(("sample", np.array(logits, dtype=np.float32), *(np.array(getattr(tensors, k)[:n]) for k in
                                                                        ("flags", "step", "state_row")),
                       np.array(result)))
        return result

    def spy_init(self, row, s):
        events.append(("init", row, s.request, s.branch))
        return real_init(self, row, s)

    monkeypatch.setattr(model_runner, "sample", spy_sample)
    monkeypatch.setattr(model_runner.ModelRunner, "_init_state_row", spy_init)
    return events


PENALIZED = [SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.3, frequency_penalty=0.4,
                            presence_penalty=0.3),
             SamplingParams(temperature=0, max_tokens=20, min_tokens=20, repetition_penalty=0.8,
                            logit_bias={5: 3.0, 9: -2.0}),
             SamplingParams(temperature=0, max_tokens=16, frequency_penalty=-0.5, allowed_token_ids=list(range(40))),
             SamplingParams(n=2, temperature=0, max_tokens=12, repetition_penalty=1.6, presence_penalty=-1.0)]


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize("pool", [256, 24], ids=["roomy", "preempting"])
def test_engine_tokens_are_the_reference_argmax_of_each_step(monkeypatch, asynchronous, pool):
    events = _recording(monkeypatch)
    eng = _engine(async_scheduling=asynchronous, eos_token_id=7, num_blocks=pool, watermark=0.0,
                  max_num_batched_tokens=16, max_num_seqs=8)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, int(rng.integers(3, 20))).tolist() for _ in PENALIZED]
    outs = eng.generate(prompts, PENALIZED, progress=False)
    owner, checked = {}, set()
    for event in events:
        if event[0] == "init":
            owner[event[1]] = event[2:]
            continue
        _, logits, flags, steps, rows, tokens = event
        for r in np.flatnonzero(flags & UPDATE):
            request, branch = owner[int(rows[r])]
            ids, step = branch.output_token_ids, int(steps[r])
            if step >= len(ids):
                continue  # sampled after the branch had ended (asynchronous scheduling): dropped
            assert ids[step] == tokens[r]
            ref = process_reference(logits[r], request.params, request.prompt_token_ids, ids[:step], [7])
            assert int(np.argmax(ref)) == tokens[r], (request.params, step)
            checked.add((id(branch), step))
    assert len(checked) >= sum(len(c.token_ids) for o in outs for c in o.outputs) - sum(p.n - 1 for p in PENALIZED)
    assert all(len(o.outputs[0].token_ids) >= p.min_tokens for o, p in zip(outs, PENALIZED))


def test_penalties_change_greedy_output_and_n_branches_keep_their_own_counts():
    eng = _engine()
    prompt = [1, 2, 3, 4]
    plain = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=24), progress=False)[0]
    rep = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=24, frequency_penalty=2.0,
                                                 presence_penalty=2.0), progress=False)[0]
    ids = rep.outputs[0].token_ids
    assert plain.outputs[0].token_ids != ids
    assert max(np.bincount(ids)) <= max(np.bincount(plain.outputs[0].token_ids))
    branches = eng.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=12,
                                                     repetition_penalty=1.5), progress=False)[0]
    assert len({tuple(c.token_ids) for c in branches.outputs}) > 1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_kernels_compile_without_spills(tmp_path):
    from pagedkv.kernels import compile as kernels

    src = tmp_path / "logits_process.cu"
    src.write_text(kernels.cu_source("logits_process.cu"))
    proc = subprocess.run([shutil.which("nvcc"), "-arch=sm_90", "--cubin", "-std=c++17", "-Xptxas", "-v", "-o",
                           str(tmp_path / "lp.cubin"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert set(re.findall(r"Compiling entry function '(\w+)'", proc.stderr)) == {
        "process_logits_f32", "process_logits_f16", "process_logits_bf16", "count_tokens"}
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    assert spills and all(s == ("0", "0") for s in spills), proc.stderr


# ---- the device kernel: bit-equal to the NumPy twin -------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_kernel_processing_equals_numpy_and_reference(dtype):
    import cupy as cp
    import ml_dtypes

    rng = np.random.default_rng(7)
    vocab, num = 1003, 6
    logits32 = (rng.standard_normal((num, vocab)) * 5).astype(np.float32)
    np_dt = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    logits = logits32.astype(np_dt)
    host = logits.astype(np.float32)
    device_logits = cp.asarray(logits.view(np.uint16)) if dtype == "bfloat16" else cp.asarray(logits)
    params = [SamplingParams(repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=-0.4),
              SamplingParams(logit_bias={1: 10.0, 2: -3.5}, min_tokens=5, allowed_token_ids=list(range(0, 900, 3))),
              SamplingParams(bad_words=["x"], repetition_penalty=0.7)]
    bad = [[], [], [[1, 2], [4], [3, 3, 3]]]
    states = {xp: LogitsState(vocab, 8, xp) for xp in (np, cp)}
    sampled = {np: np.zeros(4, np.int32), cp: cp.zeros(4, cp.int32)}
    prompts, outs = [], []
    for xp, state in states.items():
        state.ensure(8)
    for i, p in enumerate(params):
        prompt = rng.integers(0, vocab, 50).tolist()
        out = rng.integers(0, 6, 25).tolist()
        prompts.append(prompt), outs.append(out)
        for xp, state in states.items():
            state.init_row(i + 2, request_words(p, vocab, [0, 3], bad[i]), prompt, out, [-1] * len(out),
                           p.allowed_token_ids, sampled[xp])
    t = SamplingTensors.allocate(num)
    for r in range(num):  # rows 0..2: processed, 3: grammar only, 4, 5: plain
        if r < 3:
            t.flags[r], t.state_row[r], t.proc_row[r], t.step[r] = PROCESS | STATE | UPDATE, r + 2, r, 25
    t.flags[3], t.proc_row[3], t.mask_row[3] = PROCESS | MASK, 3, 1
    for state in states.values():
        state.grammar[1] = state.xp.asarray(allowed_bitmask(list(range(500, 700)), vocab))
    dev = SamplingTensors.from_rows([(SamplingParams(temperature=0), 0, 0)] * num, cp)
    t.copy_to(dev)
    from pagedkv.engine.runner.logits_process import process
    process(device_logits, dev, states[cp], {"float32": 0, "float16": 1, "bfloat16": 2}[dtype])
    process(host, t, states[np], 0)
    got = states[cp].processed.get()
    np.testing.assert_array_equal(got[:4], states[np].processed[:4])
    for r in range(3):
        _close(got[r], process_reference(host[r], params[r], prompts[r], outs[r], [0, 3] if r == 1 else [], bad[r]))
    # the sampler picks each processed row's argmax (greedy), plain rows from the raw logits
    tokens = sample(device_logits, dev, state=states[cp], logits_dtype=dtype if dtype == "bfloat16" else None)
    expect = [int(np.argmax(got[r])) for r in range(4)] + [int(np.argmax(host[r])) for r in (4, 5)]
    assert tokens.get().tolist() == expect
    count_tokens(tokens, dev, states[cp])
    count_tokens(np.array(expect, dtype=np.int32), t, states[np])
    np.testing.assert_array_equal(states[cp].counts.get(), states[np].counts)
    np.testing.assert_array_equal(states[cp].history.get(), states[np].history)


@pytest.mark.gpu
def test_gpu_engine_with_penalties_graphs_match_eager():
    from engine_gpu_support import _gpu_engine

    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [100, 200, 300, 400, 5, 6]]
    eager = _gpu_engine("float32", cuda_graph=False, async_scheduling=False)
    graphs = _gpu_engine("float32", cuda_graph=True)
    a = eager.generate(prompts, PENALIZED, progress=False)
    b = graphs.generate(prompts, PENALIZED, progress=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    seeded = [SamplingParams(temperature=0.9, seed=11, max_tokens=20, repetition_penalty=1.2, n=2,
                             bad_words=None, presence_penalty=0.5)] * 3
    a = eager.generate(prompts, seeded, progress=False)
    b = graphs.generate(prompts, seeded, progress=False)
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]
