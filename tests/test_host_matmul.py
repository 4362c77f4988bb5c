"""The CPU forward's float32 BLAS products against the float64 oracle (fresh random inputs, every weight dtype),
and a whole engine's greedy tokens and logprobs with each."""
import ml_dtypes
import numpy as np
import pytest

from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams
from pagedkv.model.host_matmul import Float32Matmul, float64_matmul, make_host_matmul

TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3, np.dtype(ml_dtypes.bfloat16): 1.6e-2}


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_float32_matmul_matches_the_float64_oracle(dtype, rows):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 96)).astype(dtype)
    w = (rng.standard_normal((96, 200)) / 10).astype(dtype)
    got, want = Float32Matmul()(x, w), float64_matmul(x, w)
    assert got.dtype == want.dtype == np.dtype(dtype)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    tol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(got.astype(np.float64), exact, atol=tol * np.abs(exact).max(), rtol=tol)


def test_float32_matmul_converts_a_low_precision_weight_once():
    mm = Float32Matmul()
    w = np.ones((8, 4), dtype=ml_dtypes.bfloat16)
    assert mm.weight(w) is mm.weight(w) and mm.weight(w).dtype == np.float32
    w32 = np.ones((8, 4), dtype=np.float32)
    assert mm.weight(w32) is w32
    with pytest.raises(ValueError, match="host_matmul must be one of"):
        make_host_matmul("float16")


def test_engine_with_float32_matmuls_agrees_with_the_float64_engine():
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(30, 60))]
    outs = {}
    for kind in ("float64", "float32"):
        engine = LLMEngine(EngineConfig(model="tiny", device="cpu", num_blocks=64, host_matmul=kind))
        outs[kind] = engine.generate(prompts, params, progress=False)
    for a, b in zip(outs["float64"], outs["float32"]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for ea, eb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for t in ea:
                assert abs(ea[t] - eb[t]) < 1e-3
    with pytest.raises(ValueError, match="host_matmul"):
        EngineConfig(host_matmul="int8")
