"""Backend choice (cpu / auto / gpu), dtype parsing, and ``import pagedkv`` without CuPy."""
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from pagedkv import KVCache, backend
from pagedkv.backend import dtype_of, get_backend, gpu_status

REPO = Path(__file__).resolve().parents[1]
GPU_USABLE, GPU_REASON = gpu_status()


def test_cpu_is_numpy():
    b = get_backend("cpu")
    assert (b.name, b.xp, b.is_gpu) == ("cpu", np, False)
    cache = KVCache(1, 2, 4, 1, 8, "float32", device="cpu")
    assert type(cache.k_pool) is np.ndarray and type(cache.v_pool) is np.ndarray
    assert cache.k_pool.shape == (1, 2, 1, 4, 8) and cache.k_pool.dtype == np.float32


@pytest.mark.skipif(GPU_USABLE, reason="a GPU is usable here: auto picks CuPy")
def test_auto_without_gpu_is_numpy():
    b = get_backend("auto")
    assert (b.name, b.xp) == ("cpu", np)
    assert type(KVCache(1, 2, 4, 1, 8, "float16").k_pool) is np.ndarray  # "auto" is the default


@pytest.mark.skipif(GPU_USABLE, reason="a GPU is usable here")
def test_gpu_without_gpu_names_the_reason():
    with pytest.raises(RuntimeError) as info:
        get_backend("gpu")
    assert GPU_REASON in str(info.value) and "gpu" in str(info.value)
    with pytest.raises(RuntimeError, match="no GPU is usable"):
        KVCache(1, 2, 4, 1, 8, "float32", device="gpu")


def test_unusable_gpu_is_reported_whatever_the_machine(monkeypatch):
    """With gpu_status forced to "unusable" (so this runs on GPU machines too): auto falls back, gpu refuses."""
    monkeypatch.setattr(backend, "gpu_status", lambda: (False, "driver went fishing"))
    assert get_backend("auto").xp is np
    with pytest.raises(RuntimeError, match="driver went fishing"):
        get_backend("gpu")


@pytest.mark.parametrize("device", ["cuda", "GPU", "", None, "cpu:0"])
def test_bad_device_string(device):
    with pytest.raises(ValueError) as info:
        get_backend(device)
    assert repr(device) in str(info.value)
    with pytest.raises(ValueError):
        KVCache(1, 2, 4, 1, 8, "float32", device=device)


@pytest.mark.parametrize("name, expected", [
    ("float16", np.float16), (np.float16, np.float16), (np.dtype("float16"), np.float16),
    ("bfloat16", ml_dtypes.bfloat16), (ml_dtypes.bfloat16, ml_dtypes.bfloat16), ("bf16", ml_dtypes.bfloat16),
    ("float32", np.float32), (np.float32, np.float32),
])
def test_dtype_of_accepts(name, expected):
    assert dtype_of(name) == np.dtype(expected)


@pytest.mark.parametrize("name", ["float64", np.float64, "int8", np.int8, "int32", "float8", "nonsense"])
def test_dtype_of_refuses(name):
    with pytest.raises(ValueError) as info:
        dtype_of(name)
    msg = str(info.value)
    assert "float16, bfloat16 or float32" in msg
    shown = {np.float64: "float64", np.int8: "int8"}.get(name, str(name))
    assert shown in msg


def test_cache_dtype_is_checked():
    with pytest.raises(ValueError, match="float64"):
        KVCache(1, 2, 4, 1, 8, "float64", device="cpu")
    assert KVCache(1, 2, 4, 1, 8, "bfloat16", device="cpu").k_pool.dtype == np.dtype(ml_dtypes.bfloat16)


def test_import_without_cupy():
    """``sys.modules['cupy'] = None`` makes ``import cupy`` fail as if it were not installed."""
    code = """
import sys
sys.modules['cupy'] = None
import numpy as np
import pagedkv
from pagedkv.backend import get_backend, gpu_status
usable, reason = gpu_status()
assert not usable and 'cupy is not importable' in reason, reason
assert get_backend('auto').xp is np
try:
    get_backend('gpu')
except RuntimeError as exc:
    assert 'cupy is not importable' in str(exc), exc
else:
    raise AssertionError('device="gpu" without cupy did not raise')
m = pagedkv.PagedAttentionManager.create(1, 4, 4, 1, 8, 'float32')
s = m.add_sequence(5)
assert m.block_table(s) == [0, 1]
assert sys.modules['cupy'] is None
print('ok')
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=False,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
