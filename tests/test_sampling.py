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
