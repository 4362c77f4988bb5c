"""Chunked prefill (issue 10): one token budget per step shared by decodes and prefill chunks; outputs identical
to whole-prompt prefill in float32 greedy (with preemption, n > 1, both policies); abort mid-prefill."""
import numpy as np
import pytest

from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams


def engine(**kwargs):
    kwargs = {"device": "cpu", "block_size": 4, "num_blocks": 256, "seed": 0, **kwargs}
    return LLMEngine(EngineConfig(**kwargs))


def prompts(num, seed, low=1, high=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(rng.integers(low, high))).tolist() for _ in range(num)]


def tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def pool_free(eng) -> bool:
    bm = eng.manager.block_manager
    return bm.num_free_blocks == bm.num_blocks and not eng.manager.seq_ids


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("variant", [
    dict(max_num_batched_tokens=4, max_num_seqs=4),
    dict(max_num_batched_tokens=7, max_num_seqs=3),
    dict(max_num_batched_tokens=9, max_num_seqs=6, num_blocks=26, watermark=0.0),  # chunks + preemption
    dict(max_num_batched_tokens=6, max_num_seqs=6, scheduling="static"),
    dict(max_num_batched_tokens=64, max_num_seqs=6, enable_chunked_prefill=False, num_blocks=26, watermark=0.0),
], ids=["budget4", "budget7", "preempt", "static", "whole-preempt"])
def test_chunked_prefill_gives_the_outputs_of_whole_prompts(variant, n):
    ps = prompts(7, seed=n)
    params = [SamplingParams(n=n, temperature=0, max_tokens=int(m))
              for m in np.random.default_rng(9).integers(1, 12, len(ps))]
    ref = tokens(engine(enable_chunked_prefill=False, max_num_batched_tokens=2048).generate(ps, params,
                                                                                           progress=False))
    eng = engine(max_model_len=64, record_steps=True, **variant)
    assert tokens(eng.generate(ps, params, progress=False)) == ref
    assert pool_free(eng)
    steps = eng.step_metrics
    budget = variant["max_num_batched_tokens"]
    if variant.get("enable_chunked_prefill", True):
        assert all(s.num_prefill_tokens + s.num_decode_tokens <= budget for s in steps)
        if variant["max_num_seqs"] >= 2 * n and variant.get("scheduling") != "static":
            assert any(s.num_prefill_tokens and s.num_decode_tokens for s in steps)  # mixed steps happen
    if variant.get("num_blocks") == 26:
        assert eng.metrics().num_preemptions > 0


def test_a_long_prompt_is_prefilled_over_several_steps_while_others_decode():
    eng = engine(max_num_batched_tokens=8, max_num_seqs=2, record_steps=True)
    short = eng.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=10))
    eng.step()
    long = eng.add_request(list(range(10, 40)), SamplingParams(temperature=0, max_tokens=2))  # 30 tokens
    seen = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            seen.setdefault(o.request_id, []).append(eng.totals.num_steps)
    per_step = [(s.num_prefill_tokens, s.num_decode_tokens) for s in eng.step_metrics[1:6]]
    assert per_step[:4] == [(7, 1)] * 4 and per_step[4] == (2, 1)  # 7 + 7 + 7 + 7 + 2 = 30 prompt tokens
    assert seen[short][:5] == [2, 3, 4, 5, 6]  # the short request decodes at every step meanwhile
    assert seen[long][0] == 6
    assert pool_free(eng)


def test_max_model_len_may_exceed_the_token_budget():
    eng = engine(max_num_batched_tokens=16, max_num_seqs=4, max_model_len=200)
    prompt = list(np.random.default_rng(0).integers(0, 256, 150))
    got = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=5), progress=False)
    want = engine(enable_chunked_prefill=False, max_num_batched_tokens=256).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=5), progress=False)
    assert tokens(got) == tokens(want)
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=16, max_num_seqs=4, max_model_len=200)


def test_abort_mid_prefill_frees_the_blocks_of_the_chunks_so_far():
    eng = engine(max_num_batched_tokens=8, max_num_seqs=4)
    rid = eng.add_request(list(range(1, 41)), SamplingParams(n=3, temperature=0, max_tokens=4))
    eng.step()
    eng.step()
    assert eng.manager.block_manager.num_used_blocks == 4  # 16 prompt tokens in 4 blocks, nothing sampled
    assert eng.step() == []  # still mid-prompt: nothing to report
    out = eng.abort_request(rid)
    assert [c.finish_reason for c in out.outputs] == ["abort"] * 3 and all(not c.token_ids for c in out.outputs)
    assert pool_free(eng) and not eng.has_unfinished_requests()


def test_preemption_of_a_partly_prefilled_request_recomputes_it():
    # the pool holds 12 blocks; A decodes long, B's 36-token prompt is chunked and preempted by A's growth
    eng = engine(num_blocks=12, watermark=0.0, max_num_batched_tokens=4, max_num_seqs=2, max_model_len=48)
    a = eng.add_request([5] * 4, SamplingParams(temperature=0, max_tokens=40))
    eng.step()
    b = eng.add_request(list(range(1, 37)), SamplingParams(temperature=0, max_tokens=3))
    outs = {}
    while eng.has_unfinished_requests():
        outs.update((o.request_id, o) for o in eng.step())
    assert outs[b].num_preemptions >= 1
    ref = engine().generate([[5] * 4, list(range(1, 37))], [SamplingParams(temperature=0, max_tokens=m)
                                                            for m in (40, 3)], progress=False)
    assert [outs[a].outputs[0].token_ids, outs[b].outputs[0].token_ids] == [r.outputs[0].token_ids for r in ref]
    assert pool_free(eng)
