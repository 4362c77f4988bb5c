"""CPU (CI): the model's own kernel file, kernels_cu/rms_norm.cu (the norm, and the norm fused with the residual
add), compiles with nvcc for sm_80 and sm_90 as the loader compiles it, every variant present and none spilling.
Skipped when nvcc is not on the PATH."""
import pytest
from test_kernels_compile import ARCHS, NVCC, _compile, ptxas_report

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")


@pytest.mark.parametrize("arch", ARCHS)
def test_rms_norm_compiles_without_spills(tmp_path, arch):
    report = ptxas_report(_compile(tmp_path, "rms_norm.cu", arch))
    assert {f"{prefix}rms_norm_{t}" for prefix in ("", "add_") for t in ("f32", "f16", "bf16")} <= set(report)
    assert all(v[1:] == (0, 0) for v in report.values())
