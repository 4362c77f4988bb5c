"""SamplingParams made concrete by the engine (issue 19): max_tokens=None, truncate_prompt_tokens, token ids
checked against the vocabulary, bad words tokenized, min_tokens honoured; refusals before anything is queued."""
import pytest

from pagedkv.engine import EngineConfig, LLMEngine
from pagedkv.sampling_params import SamplingParams


def _engine(**kwargs):
    return LLMEngine(EngineConfig(**{"device": "cpu", "block_size": 4, "num_blocks": 64, "seed": 0,
                                     "max_model_len": 40, "eos_token_id": 7, **kwargs}))


def test_max_tokens_none_runs_to_the_context_limit():
    eng = _engine()
    out = eng.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), progress=False)
    assert len(out[0].outputs[0].token_ids) == 40 - 3 and out[0].outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="no room"):
        eng.add_request(list(range(40)), SamplingParams(max_tokens=None))


def test_truncate_prompt_tokens_keeps_the_last_tokens():
    eng = _engine()
    out = eng.generate([list(range(1, 31))], SamplingParams(temperature=0, max_tokens=2, truncate_prompt_tokens=5),
                       progress=False)[0]
    assert out.prompt_token_ids == [26, 27, 28, 29, 30]
    out = eng.generate([list(range(1, 31))], SamplingParams(max_tokens=2, truncate_prompt_tokens=-1),
                       progress=False)[0]
    assert len(out.prompt_token_ids) == 30


@pytest.mark.parametrize("params, match", [
    (SamplingParams(logit_bias={256: 1.0}), "logit_bias"), (SamplingParams(allowed_token_ids=[1, 999]),
                                                           "allowed_token_ids"),
    (SamplingParams(bad_words=["hello"]), "tokenizer"), (SamplingParams(min_tokens=20, max_tokens=None),
                                                          "min_tokens"),
])
def test_requests_the_engine_cannot_honour_are_refused_before_queueing(params, match):
    eng = _engine()
    with pytest.raises(ValueError, match=match):
        eng.add_request(list(range(1, 25)), params)
    assert not eng.has_unfinished_requests()


def test_min_tokens_suppresses_eos_until_reached():
    eng = _engine(eos_token_id=None)
    probe = eng.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=12), progress=False)[0]
    first = probe.outputs[0].token_ids[0]
    eng = _engine(eos_token_id=first)  # the greedy first token is EOS: ends at once without min_tokens
    assert eng.generate([[1, 2, 3]], SamplingParams(temperature=0), progress=False)[0].outputs[0].token_ids == [first]
    out = eng.generate([[1, 2, 3]], SamplingParams(temperature=0, min_tokens=5, max_tokens=12), progress=False)[0]
    ids = out.outputs[0].token_ids
    assert len(ids) >= 5 and first not in ids[:5]


def test_penalties_with_ignore_eos_and_min_tokens_run():  # ignore_eos: min_tokens masks the stop ids only
    eng = _engine()
    out = eng.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, min_tokens=3,
                                                    presence_penalty=0.5, stop_token_ids=[9]), progress=False)[0]
    assert len(out.outputs[0].token_ids) >= 3 and 9 not in out.outputs[0].token_ids[:3]
