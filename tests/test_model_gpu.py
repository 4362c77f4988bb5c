"""GPU pieces of the model against float64 references: the ctypes cuBLAS product of pagedkv.model.cublas,
eager and replayed from a CUDA graph (the reason it exists: CuPy's own matmul cannot be captured), and the
RMSNorm kernel of kernels_cu/rms_norm.cu."""
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
@pytest.mark.parametrize("m", [1, 7, 128, 300, 513])  # 300 and 513 rows are padded to multiples of 64
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


@pytest.mark.parametrize("dtype", list(RTOL), ids=str)
@pytest.mark.parametrize("hidden", [64, 2048, 3000])
def test_rms_norm_kernel_matches_float64(dtype, hidden):
    import cupy as cp

    from pagedkv.kernels import norm

    rng = np.random.default_rng(hidden)
    x = (3 * rng.standard_normal((37, hidden))).astype(np.float32).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32).astype(dtype)
    dx, dw = cp.asarray(x.view(np.uint16) if dtype == BF16 else x), cp.asarray(w.view(np.uint16) if dtype == BF16 else w)
    out = cp.full(dx.shape, np.nan, dtype=np.float32).astype(dx.dtype) if dtype != BF16 else cp.full(dx.shape, 0x7FC0, np.uint16)
    norm.rms_norm_kernel(dtype)((x.shape[0],), (norm.NORM_THREADS,), (
        out, dx, dw, np.int32(hidden), np.float32(1.0 / hidden), np.float32(1e-5)))
    got = out.get()
    got = (got.view(BF16) if dtype == BF16 else got).astype(np.float64)
    x64 = x.astype(np.float64)
    ref = w.astype(np.float64) * x64 / np.sqrt((x64 ** 2).mean(axis=-1, keepdims=True) + 1e-5)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=str)
@pytest.mark.parametrize("hidden", [64, 2048, 3000])
def test_fused_add_norm_is_bitwise_the_add_then_the_norm_kernel(dtype, hidden):
    import cupy as cp

    from pagedkv.model import ModelConfig
    from pagedkv.model.fused import FusedOps
    from pagedkv.model.layers import Rope

    config = ModelConfig(vocab_size=64, hidden_size=hidden, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64,
                         intermediate_size=128, rms_norm_eps=1e-5)
    fused = FusedOps(config, Rope(64, 1e4, 16, cp), dtype)
    rng = np.random.default_rng(hidden)
    x = cp.asarray((3 * rng.standard_normal((37, hidden))).astype(dtype))
    y = cp.asarray(rng.standard_normal((37, hidden)).astype(dtype))
    w = cp.asarray((1 + 0.1 * rng.standard_normal(hidden)).astype(dtype))
    got_x, got_h = fused.add_norm(x.copy(), y, w)
    want_x = x + y
    assert fused.fused_add and cp.array_equal(got_x, want_x)
    assert cp.array_equal(got_h, fused.norm(want_x, w))  # the very bits: greedy outputs cannot change
    s = want_x.get().astype(np.float64)
    ref = w.get().astype(np.float64) * s / np.sqrt((s * s).mean(axis=-1, keepdims=True) + 1e-5)
    got = got_h.get().astype(np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= RTOL[np.dtype(dtype)] * 5
