"""CPU (CI): every kernels_cu/*.cu compiles with nvcc for sm_80 and sm_90, kernels 2 and 3 never spill, their
shuffles are exactly the ones the algorithm needs (none duplicated into divergent branches), and the Python
mirrors of the kernels' tile shape and shared memory (pagedkv.kernels.decode_plan) match the C++.

Compiled exactly as the loader does (pagedkv.kernels.compile.cu_source: common.cuh inlined, same -D defines);
the templates are instantiated by taking the address of every name expression the loader asks for.
NOTE: all instantiations of paged_attention.cu (3 dtypes x 9 head dims x (v1, 4 GT x (v2, v3), merges),
298 kernels) take about two minutes per architecture on one core, so CI compiles a representative subset:
head dims 128 (power-of-two rows, the benchmarked shape) and 80 (the most idle lanes), every dtype and GT.
PAGEDKV_COMPILE_ALL=1 compiles every head dim (last run: no spills on sm_80 or sm_90, kernels_cu/NOTES.md).
Skipped when nvcc is not on the PATH.
"""
import math
import os
import re
import shutil
import subprocess

import pytest

from pagedkv.kernels import compile, decode, decode_plan, decode_tc

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
ARCHS = ("sm_80", "sm_90")
DEFINES = (("PAGEDKV_V2_TILE_BYTES", decode_plan.V2_TILE_BYTES), ("PAGEDKV_V2_STAGES", decode_plan.V2_STAGES))
HEAD_DIMS = decode.HEAD_DIMS if os.environ.get("PAGEDKV_COMPILE_ALL") == "1" else (80, 128)


def _instantiations(dt: int) -> str:
    fp8 = (3, 4) if dt in (1, 2) else ()  # fp8 caches under 16-bit queries
    names = [n for hd in HEAD_DIMS for ct in (None, *fp8) for n in decode.attention_names(dt, hd, ct)]
    refs = ",\n  ".join(f"(const void*)&{n}" for n in names)
    return f"\nconst void* pagedkv_instantiate[] = {{\n  {refs}\n}};\n"


def _compile(tmp_path, filename: str, arch: str, extra: str = "", tag: str = "") -> str:
    src = tmp_path / f"{filename}.{arch}{tag}.cu"
    src.write_text(compile.cu_source(filename) + extra)
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


@pytest.mark.parametrize("dt", (0, 1, 2))
@pytest.mark.parametrize("arch", ARCHS)
def test_paged_attention_compiles_without_spills(tmp_path, arch, dt):
    report = ptxas_report(_compile(tmp_path, "paged_attention.cu", arch, _instantiations(dt), f".dt{dt}"))
    cache_types = 3 if dt in (1, 2) else 1
    for kernel in ("paged_attention_v2_kernel", "paged_attention_v3_kernel"):
        found = {n: r for n, r in report.items() if kernel in n}
        assert len(found) == len(HEAD_DIMS) * len(decode.GROUP_TILES) * cache_types, kernel
    assert "check_block_tables_kernel" in report
    spilled = {n: r for n, r in report.items() if r[1] or r[2]}
    assert not spilled, f"spills (registers, store bytes, load bytes): {spilled}"


@pytest.mark.parametrize("arch", ARCHS)
def test_paged_attention_tc_compiles_without_spills(tmp_path, arch):
    """Decode version 4 (paged_attention_tc.cu): every instantiation the launcher asks for (float16 / bfloat16 q,
    head dims 64 / 128, a cache of q's type, e4m3, e5m2) compiles without spills."""
    names = [n for dt in (1, 2) for hd in decode_tc.HEAD_DIMS for n in decode_tc.kernel_names(dt, hd)]
    refs = ",\n  ".join(f"(const void*)&{n}" for n in names)
    report = ptxas_report(_compile(tmp_path, "paged_attention_tc.cu", arch,
                                   f"\nconst void* pagedkv_instantiate[] = {{\n  {refs}\n}};\n"))
    found = {n: r for n, r in report.items() if "paged_attention_tc_kernel" in n}
    assert len(found) == len(names)
    spilled = {n: r for n, r in found.items() if r[1] or r[2]}
    assert not spilled, f"spills (registers, store bytes, load bytes): {spilled}"


def test_tc_smem_mirror(tmp_path):
    """decode_tc.smem_bytes equals Tc<DT, HEAD_DIM, CT, FRAG>::SMEM_BYTES in paged_attention_tc.cu (fp8 caches:
    both paths, FRAG 1 = "registers")."""
    cases = [(dt, hd, ct, frag) for dt in (1, 2) for hd in decode_tc.HEAD_DIMS for ct in (dt, *decode_tc.FP8_CTS)
             for frag in ((0, 1) if ct in decode_tc.FP8_CTS else (0,))]
    body = "\n".join(f'  printf("{dt} {hd} {ct} {frag} %d\\n", decode_tc::Tc<{dt}, {hd}, {ct}, {frag}>::SMEM_BYTES);'
                     for dt, hd, ct, frag in cases)
    src = tmp_path / "tc_smem.cu"
    src.write_text(compile.cu_source("paged_attention_tc.cu") + f"\n#include <cstdio>\nint main() {{\n{body}\n}}\n")
    exe = tmp_path / "tc_smem"
    proc = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == len(cases)
    for line in lines:
        dt, hd, ct, frag, smem = map(int, line.split())
        assert decode_tc.smem_bytes(ct, hd, decode_tc.FP8_PATHS[frag]) == smem, line


def test_tile_shape_and_smem_mirrors(tmp_path):
    """decode_plan's tile_shape / v2_smem_bytes / v3_smem_bytes equal TileShape / TileSmem in the .cu, for
    every dtype, head dim, GT and the benchmark's tile sizes (a host program prints the C++ constants)."""
    cases = [(dt, hd, gt, tb) for dt in (0, 1, 2) for hd in decode.HEAD_DIMS for gt in decode.GROUP_TILES
             for tb in (4096, 8192)]
    lines = []
    for tb in (4096, 8192):
        body = "\n".join(
            f'  printf("{dt} {hd} {gt} {tb} %d %d %d %d %d\\n", TileShape<{dt}, {hd}>::TILE_TOKENS, '
            f"TileShape<{dt}, {hd}>::LPR, TileSmem<{dt}, {hd}, {gt}>::PIPE, TileSmem<{dt}, {hd}, {gt}>::RED, "
            f"TileSmem<{dt}, {hd}, {gt}>::PIPE + TileSmem<{dt}, {hd}, {gt}>::Q + TileSmem<{dt}, {hd}, {gt}>::RED + "
            f"TileSmem<{dt}, {hd}, {gt}>::SMALL + TileSmem<{dt}, {hd}, {gt}>::META);"
            for dt, hd, gt, t in cases if t == tb)
        src = tmp_path / f"shapes{tb}.cu"
        src.write_text(compile.cu_source("paged_attention.cu") + f"\n#include <cstdio>\nint main() {{\n{body}\n}}\n")
        exe = tmp_path / f"shapes{tb}"
        proc = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", f"-DPAGEDKV_V2_TILE_BYTES={tb}", "-o", str(exe),
                               str(src)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        lines += subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == len(cases)
    for line in lines:
        dt, hd, gt, tb, tile_tokens, lpr, pipe, red, v3_smem = map(int, line.split())
        shape = decode_plan.tile_shape(dt, hd, tb)
        assert (shape["tile_tokens"], shape["lpr"]) == (tile_tokens, lpr), line
        assert decode_plan.v2_smem_bytes(dt, hd, gt, tb) - decode_plan.smem_parts(dt, hd, gt, tb, 4)["small"] == \
            max(pipe, red), line
        assert decode_plan.v3_smem_bytes(dt, hd, gt, tb) == v3_smem, line


def _expected_shuffles(kernel: str, dt: int, head_dim: int, gt: int, butterfly: bool) -> int:
    """xor shuffles in one kernel's code: per tile row the q.k reduction (butterfly: GT - 1 trades, then
    log2(LPR / GT) sums; else log2(LPR) per head), per softmax head a max and a sum (5 + 5); kernel 3 holds
    the tile step twice (the balanced walk and the dispatcher's partition plan), each with the merge's
    (max, sum) pair reduction (2 x 5 per head group of warps)."""
    shape = decode_plan.tile_shape(dt, head_dim)
    lpr, rows, warps_heads = shape["lpr"], shape["tile_tokens"] // shape["row_groups"], -(-gt // 4)
    per_row = (gt - 1) + int(math.log2(lpr // gt)) if butterfly and lpr >= gt else gt * int(math.log2(lpr))
    step = rows * per_row + warps_heads * 10
    return step if kernel == "v2" else 2 * (step + warps_heads * 10)


@pytest.mark.parametrize("butterfly", (1, 0))
def test_no_divergent_shuffles(tmp_path, butterfly):
    """nvcc/NVRTC 13 once duplicated kernel 2's q.k shuffles into the two arms of a lane-dependent branch
    (26 shuffles instead of 20 for float16/128/GT 4; 1.5x slower, 3.3x without the butterfly): the PTX
    must hold exactly the shuffles the algorithm needs."""
    cases = [(k, dt, hd, gt) for k in ("v2", "v3") for dt in (0, 1) for hd in HEAD_DIMS for gt in decode.GROUP_TILES]
    refs = "\n".join(f"const void* i{n} = (const void*)&paged_attention_{k}_kernel<{dt}, {hd}, {gt}>;"
                     for n, (k, dt, hd, gt) in enumerate(cases))
    src = tmp_path / "shuffles.cu"
    src.write_text(compile.cu_source("paged_attention.cu") + "\n" + refs + "\n")
    ptx = tmp_path / "shuffles.ptx"
    proc = subprocess.run([NVCC, "-arch=sm_90", "-ptx", "-std=c++17", f"-DPAGEDKV_V2_BUTTERFLY={butterfly}",
                           "-o", str(ptx), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    found = {}
    for body in ptx.read_text().split(".visible .entry ")[1:]:
        m = re.match(r"_Z\d+paged_attention_(v[23])_kernelILi(\d)ELi(\d+)ELi(\d)E", body)
        if m:
            found[(m.group(1), *map(int, m.groups()[1:]))] = body.count("shfl.sync.bfly")
    assert len(found) == len(cases)
    wrong = {c: (n, _expected_shuffles(*c, bool(butterfly))) for c, n in found.items()
             if n != _expected_shuffles(*c, bool(butterfly))}
    assert not wrong, f"(kernel, dtype, head_dim, GT): (shuffles in the PTX, expected) {wrong}"


def test_cu_source_inlines_every_local_header():
    """What CuPy compiles has no ``#include "...cuh"`` left (NVRTC gets no include path) and holds each header's
    text, so a header edit changes the cache key of every file that includes it."""
    from pagedkv.kernels import compile as kcompile

    folder = kcompile.cu_dir()
    for path in sorted(folder.glob("*.cu")):
        text = kcompile.cu_source(path.name)
        assert '#include "' not in text, path.name
        for header in ("common.cuh", "mma.cuh"):
            if f'#include "{header}"' in path.read_text():
                assert (folder / header).read_text() in text, (path.name, header)
