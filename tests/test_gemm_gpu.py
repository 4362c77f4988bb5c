"""GPU: the ctypes cuBLAS product of pagedkv.model.cublas against a float64 reference, eager and replayed
from a CUDA graph (the reason it exists: CuPy's own matmul cannot be captured)."""
import ml_dtypes
import numpy as np
import pytest

pytestmark = pytest.mark.gpu
BF16 = np.dtype(ml_dtypes.bfloat16)
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3, BF16: 1.6e-2}


def _gemm():
    from pagedkv.model.cublas import CublasGemm

    return CublasGemm()


@pytest.mark.parametrize("dtype", list(RTOL), ids=str)
@pytest.mark.parametrize("layout", ["c", "f"])
@pytest.mark.parametrize("m", [1, 7, 128, 300])
def test_gemm_matches_float64(dtype, layout, m):
    import cupy as cp

    rng = np.random.default_rng(m)
    k, n = 256, 384
    x = rng.standard_normal((m, k)).astype(np.float32).astype(dtype)
    w = rng.standard_normal((k, n)).astype(np.float32).astype(dtype)
    dw = cp.asarray(w) if layout == "c" else cp.ascontiguousarray(cp.asarray(w).T).T
    assert dw.flags.c_contiguous == (layout == "c")
    got = _gemm()(cp.asarray(x), dw).astype(cp.float64).get()
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= RTOL[dtype]


def test_gemm_replays_from_a_cuda_graph_with_new_inputs():
    import cupy as cp

    gemm = _gemm()
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((64, 128)).astype(np.float16))
    w = cp.asarray(rng.standard_normal((128, 512)).astype(np.float16))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        gemm(x, w)  # binds the handle to this stream outside the capture
        stream.synchronize()
        stream.begin_capture()
        out = gemm(x, w)
        graph = stream.end_capture()
    for seed in (1, 2):
        x[...] = cp.asarray(np.random.default_rng(seed).standard_normal((64, 128)).astype(np.float16))
        out.fill(np.nan)
        graph.launch(stream)
        stream.synchronize()
        ref = x.get().astype(np.float64) @ w.get().astype(np.float64)
        got = out.get().astype(np.float64)
        assert np.isfinite(got).all()
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= RTOL[np.dtype(np.float16)]


def test_gemm_refuses_bad_shapes():
    import cupy as cp

    with pytest.raises(ValueError, match="gemm needs"):
        _gemm()(cp.ones((3, 4), np.float16), cp.ones((5, 6), np.float16))
