"""Sampling in the model runner (issue 11): every row is drawn by ``pagedkv.engine.runner.sampler.sample`` (the NumPy
path on the CPU, the same algorithm as the device kernel) with its branch's seed and ``step`` = the branch's
generated-token count, so a seeded request gives the same tokens alone or in any batch, preempted or not;
greedy rows are the argmax of their logits."""
import numpy as np
import pytest

import pagedkv.engine.runner.model_runner as model_runner
from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams
from pagedkv.engine.runner.sampler import sample

SEEDED = SamplingParams(n=2, temperature=0.8, top_p=0.95, seed=123, max_tokens=16)


def engine(asynchronous=False, **kwargs):
    kwargs = {"device": "cpu", "block_size": 4, "num_blocks": 256, "seed": 0, **kwargs}
    return LLMEngine(EngineConfig(async_scheduling=asynchronous, **kwargs))


def tokens(out):
    return [c.token_ids for c in out.outputs]


def others(num=7, seed=3):
    rng = np.random.default_rng(seed)
    params = [SamplingParams(temperature=0, max_tokens=20), SamplingParams(temperature=1.0, max_tokens=18),
              SamplingParams(n=3, temperature=0.7, top_k=10, seed=5, max_tokens=12),
              SamplingParams(temperature=1.2, min_p=0.1, max_tokens=15)]
    return [rng.integers(0, 256, int(rng.integers(4, 30))).tolist() for _ in range(num)], \
        [params[i % len(params)] for i in range(num)]


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize("pool", [256, 28], ids=["roomy", "preempting"])
def test_a_seeded_request_gives_the_same_tokens_alone_or_in_a_batch(asynchronous, pool):
    prompt = [11, 22, 33, 44, 55, 66]
    alone = engine().generate([prompt], SEEDED, progress=False)[0]
    assert tokens(alone)[0] != tokens(alone)[1]  # branches draw independently
    ps, params = others(4)
    eng = engine(asynchronous, num_blocks=pool, watermark=0.0, max_num_seqs=8, max_num_batched_tokens=24)
    outs = eng.generate(ps + [prompt], params + [SEEDED], progress=False)  # the newest: preempted first
    assert tokens(outs[-1]) == tokens(alone)
    if pool == 28:
        assert outs[-1].num_preemptions > 0  # it was recomputed, and drew the same tokens again


def record_samples(monkeypatch) -> list:
    """Every sampler call of the runner: (logits, temperature, seed, step, sampled) as host copies."""
    calls = []

    def spy(logits, tensors, out=None, **kwargs):
        result = sample(logits, tensors, out=out, **kwargs)
        n = logits.shape[0]
        calls.append((np.array(logits, dtype=np.float32), tensors.temperature[:n].copy(), tensors.seed[:n].copy(),
                      tensors.step[:n].copy(), np.array(result)))
        return result
    monkeypatch.setattr(model_runner, "sample", spy)
    return calls


def test_each_row_samples_with_its_branch_seed_and_generated_count(monkeypatch):
    calls = record_samples(monkeypatch)
    out = engine().generate([[1, 2, 3]], SamplingParams(n=2, temperature=1.0, seed=42, max_tokens=5),
                            progress=False)[0]
    seeds = [SamplingParams(seed=42).branch_seed(i) for i in range(2)]
    drawn = {}  # (seed, step) -> token
    for _, temperature, seed, step, result in calls:
        for t, s, k, tok in zip(temperature, seed, step, result):
            if t > 0:
                drawn[(int(s), int(k))] = int(tok)
    for i, c in enumerate(out.outputs):
        assert [drawn[(seeds[i], j)] for j in range(5)] == c.token_ids


def test_greedy_rows_are_the_argmax_of_their_logits(monkeypatch):
    calls = record_samples(monkeypatch)
    engine().generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=6), progress=False)
    greedy = [(row, tok) for logits, temperature, _, _, result in calls
              for row, t, tok in zip(logits, temperature, result) if t == 0]
    assert len(greedy) >= 12 and all(int(np.argmax(row)) == tok for row, tok in greedy)


def test_unseeded_requests_draw_per_branch_seeds_from_the_engine_seed():
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8)
    a = tokens(engine(seed=0).generate([[7, 8, 9]], params, progress=False)[0])
    assert len({tuple(t) for t in a}) == 4
    assert tokens(engine(seed=0).generate([[7, 8, 9]], params, progress=False)[0]) == a
    assert tokens(engine(seed=1).generate([[7, 8, 9]], params, progress=False)[0]) != a
