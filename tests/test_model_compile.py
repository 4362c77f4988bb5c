"""CPU (CI): the model's own kernel file, kernels_cu/add_rms_norm.cu, compiles with nvcc for sm_80 and sm_90
as the loader compiles it, every variant present and none spilling. Skipped when nvcc is not on the PATH."""
import pytest
from test_kernels_compile import ARCHS, NVCC, _compile, ptxas_report

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")


@pytest.mark.parametrize("arch", ARCHS)
def test_add_rms_norm_compiles_without_spills(tmp_path, arch):
    report = ptxas_report(_compile(tmp_path, "add_rms_norm.cu", arch))
    assert {"add_rms_norm_f32", "add_rms_norm_f16", "add_rms_norm_bf16"} <= set(report)
    assert all(v[1:] == (0, 0) for v in report.values())
