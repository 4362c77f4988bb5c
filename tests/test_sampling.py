"""SamplingParams validation, and a host inverse-CDF sampler (temperature, top-k, top-p) as a float64 oracle."""
import numpy as np
import pytest

from pagedkv.sampling_params import SamplingParams


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Sampling distribution over the vocabulary after temperature, top-k and top-p (float64 [vocab])."""
    z = np.asarray(logits, dtype=np.float64) / params.temperature
    if 0 < params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, params.top_p)) + 1]  # smallest prefix with mass >= top_p
        mask = np.zeros_like(p)
        mask[keep] = 1
        p = p * mask
        p /= p.sum()
    return p


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from ``logits`` [vocab] (host float array); greedy draws no random number.

    NOTE: the engine samples with :mod:`pagedkv.engine.runner.sampler` (batched, on the device, seeded per
    branch); this inverse-CDF draw checks :func:`probabilities` here."""
    if params.greedy:
        return int(np.argmax(logits))
    p = probabilities(logits, params)
    return int(min(np.searchsorted(np.cumsum(p), rng.random(), side="right"), p.size - 1))


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0}, "n must be"), ({"n": 1.5}, "n must be"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": 2.5}, "top_k"), ({"seed": -1}, "seed"),
])
def test_bad_sampling_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_greedy_is_argmax_and_draws_nothing():
    logits = np.array([0.1, 3.0, -1.0, 2.9])
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert sample(logits, SamplingParams(temperature=0), rng) == 1
    assert rng.bit_generator.state == state


def test_top_k_and_top_p_filter():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    p = probabilities(logits, SamplingParams(top_k=2))
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0])
    p = probabilities(logits, SamplingParams(top_p=0.79))  # smallest prefix with mass >= 0.79
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0])
    p = probabilities(logits, SamplingParams(top_p=0.81))
    np.testing.assert_allclose(p, np.array([0.5, 0.3, 0.15, 0]) / 0.95)
    assert sample(logits, SamplingParams(top_k=1), np.random.default_rng(1)) == 0
    assert sample(logits, SamplingParams(top_p=0.01), np.random.default_rng(1)) == 0


def test_temperature_sharpens_and_sampling_follows_the_distribution():
    logits = np.array([1.0, 2.0, 0.0])
    cold, hot = (probabilities(logits, SamplingParams(temperature=t)) for t in (0.5, 2.0))
    assert cold[1] > hot[1]
    rng = np.random.default_rng(0)
    draws = np.bincount([sample(logits, SamplingParams(), rng) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(draws, probabilities(logits, SamplingParams()), atol=0.03)


def test_branch_seeds_are_reproducible_and_independent_per_branch():
    a, b = SamplingParams(n=3, seed=7), SamplingParams(n=3, seed=7)
    assert [a.branch_seed(i) for i in range(3)] == [b.branch_seed(i) for i in range(3)]
    assert len({a.branch_seed(i) for i in range(3)}) == 3
    assert SamplingParams(n=3).branch_seed(1) is None


def test_sampling_params_are_frozen_and_normalised():
    p = SamplingParams(stop="###", stop_token_ids=[np.int64(3)], max_tokens=np.int32(4))
    assert p.stop == ("###",) and p.stop_token_ids == (3,) and type(p.max_tokens) is int
    with pytest.raises(AttributeError):
        p.max_tokens = 100


@pytest.mark.parametrize("kwargs, match", [
    ({"n": True}, "n must be"), ({"n": 10**6}, "n must be"), ({"temperature": 5e-324}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"min_p": 1.5}, "min_p"), ({"top_k": -2}, "top_k"),
    ({"logprobs": 21}, "logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"stop": [""]}, "stop"),
    ({"stop": 3}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"ignore_eos": 1}, "ignore_eos"),
    ({"seed": True}, "seed"),
])
def test_more_bad_sampling_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


# ---- vLLM's fields (issue 19) --------------------------------------------------------------------------------

from dataclasses import replace  # noqa: E402

from pagedkv.sampling_params import SamplingParamsError  # noqa: E402
from pagedkv.structured_params import GuidedDecodingParams, StructuredOutputsParams  # noqa: E402


def test_vllm_defaults_and_names():
    p = SamplingParams()
    assert (p.n, p.best_of, p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.temperature, p.top_p,
            p.top_k, p.min_p, p.seed, p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs,
            p.skip_special_tokens, p.spaces_between_special_tokens, p.include_stop_str_in_output,
            p.truncate_prompt_tokens, p.structured_outputs, p.logit_bias, p.allowed_token_ids, p.bad_words) == \
        (1, None, 0.0, 0.0, 1.0, 1.0, 1.0, 0, 0.0, None, 16, 0, None, None, True, True, False, None, None, None,
         None, None)
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(stop=None, stop_token_ids=None).stop == ()


def test_clone_is_an_equal_copy():
    p = SamplingParams(temperature=0.5, logit_bias={"3": 1}, bad_words=["x"], stop="##")
    q = p.clone()
    assert q == p and q is not p and q.logit_bias == {3: 1.0} and q.bad_words == ("x",)
    assert replace(p, max_tokens=3).max_tokens == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.1}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
    ({"best_of": 2}, "best_of"), ({"n": 3, "best_of": 2}, "best_of"), ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {1: float("nan")}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"), ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
    ({"bad_words": [""]}, "bad_words"), ({"bad_words": 3}, "bad_words"), ({"truncate_prompt_tokens": 0},
                                                                           "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"), ({"spaces_between_special_tokens": 0},
                                                                  "spaces_between_special_tokens"),
    ({"presence_penalty": "0.5"}, "presence_penalty"), ({"top_k": True}, "top_k"),
    ({"structured_outputs": {"regex": "a+", "choice": ["x"]}}, "exactly one"),
    ({"structured_outputs": {"jsn": {}}}, "unknown field"), ({"guided_decoding": 3}, "guided_decoding"),
    ({"structured_outputs": {"json": "{"}}, "not valid JSON"), ({"structured_outputs": {"choice": []}}, "choice"),
    ({"structured_outputs": {"regex": "a", "backend": "xgrammar"}}, "backend"),
])
def test_vllm_fields_are_validated_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)


def test_unknown_fields_are_refused_naming_them():
    with pytest.raises(SamplingParamsError, match="no field 'temprature'"):
        SamplingParams(temprature=0.5)
    with pytest.raises(TypeError):  # a vLLM user's except TypeError still catches it
        SamplingParams(use_beam_search=True)


def test_structured_outputs_and_guided_decoding_are_one_field():
    p = SamplingParams(guided_decoding=GuidedDecodingParams(choice=["yes", "no"]))
    assert p.structured_outputs == p.guided_decoding == StructuredOutputsParams(choice=("yes", "no"))
    q = SamplingParams(structured_outputs={"json": {"type": "object"}})
    assert q.structured_outputs.kind == "json" and q.guided_decoding is q.structured_outputs
    assert SamplingParams(structured_outputs={"json_object": True}).structured_outputs.kind == "json_object"
