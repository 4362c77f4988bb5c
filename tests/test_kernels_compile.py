"""CPU (CI): every kernels_cu/*.cu compiles with nvcc for sm_80 and sm_90, and kernel 2 never spills.

Compiled exactly as the loader does (pagedkv.kernels.cu_source: common.cuh inlined, same -D defines);
the templates are instantiated by taking the address of every name expression the loader asks for.
Skipped when nvcc is not on the PATH.
"""
import re
import shutil
import subprocess

import pytest

from pagedkv import kernels

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
ARCHS = ("sm_80", "sm_90")
DEFINES = (("PAGEDKV_V2_TILE_BYTES", kernels.V2_TILE_BYTES), ("PAGEDKV_V2_STAGES", kernels.V2_STAGES))


def _instantiations() -> str:
    names = [n for dt in (0, 1, 2) for hd in kernels.HEAD_DIMS for n in kernels._attention_names(dt, hd)]
    refs = ",\n  ".join(f"(const void*)&{n}" for n in names)
    return f"\nconst void* pagedkv_instantiate[] = {{\n  {refs}\n}};\n"


def _compile(tmp_path, filename: str, arch: str, extra: str = "") -> str:
    src = tmp_path / f"{filename}.{arch}.cu"
    src.write_text(kernels.cu_source(filename) + extra)
    cmd = [NVCC, f"-arch={arch}", "--cubin", "-std=c++17", "-Xptxas", "-v", "-o", str(src.with_suffix(".cubin")),
           *(f"-D{k}={v}" for k, v in DEFINES), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed for {filename} ({arch}):\n{proc.stderr}"
    return proc.stderr


def ptxas_report(log: str) -> dict[str, tuple[int, int, int]]:
    """{mangled kernel name: (registers, spill store bytes, spill load bytes)} from ``-Xptxas -v``."""
    report, name, spills = {}, None, (0, 0)
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spills = (int(m.group(1)), int(m.group(2)))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            report[name] = (int(m.group(1)), *spills)
            name = None
    return report


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename,kernel_names", [
    ("cache_ops.cu", {"write_kv_w16", "write_kv_w2", "copy_blocks_w16", "check_index_kernel"}),
    ("bench_ops.cu", {"read_ceiling_kernel1"}),
    ("rms_norm.cu", {"rms_norm_f32", "rms_norm_f16", "rms_norm_bf16"}),
])
def test_plain_kernels_compile(tmp_path, arch, filename, kernel_names):
    report = ptxas_report(_compile(tmp_path, filename, arch))
    assert kernel_names <= set(report)


@pytest.mark.parametrize("arch", ARCHS)
def test_paged_attention_compiles_without_v2_spills(tmp_path, arch):
    report = ptxas_report(_compile(tmp_path, "paged_attention.cu", arch, _instantiations()))
    v2 = {n: r for n, r in report.items() if "paged_attention_v2_kernel" in n}
    assert len(v2) == 3 * len(kernels.HEAD_DIMS) * len(kernels.GROUP_TILES)
    spilled = {n: r for n, r in v2.items() if r[1] or r[2]}
    assert not spilled, f"kernel 2 spills (registers, store bytes, load bytes): {spilled}"

