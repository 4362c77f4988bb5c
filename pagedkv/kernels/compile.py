"""The one compile door for ``kernels_cu/``: source loading, the module cache, dtype codes, the sm_90a path.

Every launcher of :mod:`pagedkv.kernels` gets its CUDA functions here. One compiled module per file,
template instantiations and ``-D`` defines, cached for the process (CuPy caches extern "C" modules on disk
too; templated ones it recompiles per process). A compile error raises :class:`KernelCompileError` naming
the ``.cu`` file and carrying the compiler log.

Element types travel to the kernels as a template parameter ``DT`` (:func:`dt_code`)::

    0 float32    1 float16    2 bfloat16

bfloat16: CuPy arrays of ``ml_dtypes.bfloat16`` are used directly when CuPy accepts them; otherwise pass
uint16 views and ``kv_dtype="bfloat16"``; the kernels only see raw 16-bit words either way.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import ml_dtypes
import numpy as np

U64_MAX = np.iinfo(np.uint64).max  # "nothing found" in the GPU-side range checks' result words
DT_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(ml_dtypes.bfloat16): 2}
DT_SUFFIXES = {0: "f32", 1: "f16", 2: "bf16"}  # extern "C" kernels named per type: rms_norm_f16, sample_bf16


class KernelCompileError(RuntimeError):
    """A ``kernels_cu/*.cu`` file failed to compile; the message holds the file and the compiler log."""


def cu_dir() -> Path:
    """The folder of the ``.cu`` sources: ``pagedkv/kernels_cu`` when installed, else the checkout's."""
    package = Path(__file__).parent.parent
    installed = package / "kernels_cu"
    return installed if installed.is_dir() else package.parent / "kernels_cu"


def cu_source(filename: str) -> str:
    """The text of ``kernels_cu/<filename>`` with its ``#include "<name>.cuh"`` lines (the headers of kernels_cu/:
    common.cuh, mma.cuh, ...) inlined, so CuPy's cache key covers the headers too."""
    folder = cu_dir()
    lines = []
    for line in (folder / filename).read_text().splitlines(keepends=True):
        header = line.strip()[len('#include "'):-1] if line.startswith('#include "') else None
        lines.append((folder / header).read_text() if header and header.endswith(".cuh") else line)
    return "".join(lines)


@lru_cache(maxsize=None)
def load_module(filename: str, name_expressions: tuple[str, ...], defines: tuple[tuple[str, int], ...] = ()):
    """``kernels_cu/<filename>`` compiled by CuPy (``-std=c++17`` and ``-D<k>=<v>`` per define)."""
    import cupy

    options = ("-std=c++17",) + tuple(f"-D{k}={v}" for k, v in defines)
    module = cupy.RawModule(code=cu_source(filename), options=options,
                            name_expressions=list(name_expressions) or None)
    try:
        module.compile()
    except cupy.cuda.compiler.CompileException as exc:
        raise KernelCompileError(f"compiling {cu_dir() / filename} {options} failed:\n{exc}") from exc
    return module


@lru_cache(maxsize=None)
def load_function(filename, name, name_expressions=(), defines=()):
    """One kernel of ``kernels_cu/<filename>``: an extern "C" name, or a template instantiation listed in
    ``name_expressions``."""
    return load_module(filename, tuple(name_expressions), tuple(defines)).get_function(name)


@lru_cache(maxsize=None)
def load_sm90a(filename: str, name: str, defines: tuple = ()):
    """One template instantiation compiled for sm_90a by NVRTC directly: ``(module, function)``.

    NOTE: CuPy's RawModule appends its own ``-arch=sm_90``, under which ptxas rejects wgmma, so this module is
    built here (no disk cache: about a second per instantiation, once per process).
    """
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(cu_source(filename), filename, (), ())
    try:
        nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, ("-std=c++17", "-arch=sm_90a", *(f"-D{k}={v}" for k, v in defines)))
        except nvrtc.NVRTCError as exc:
            raise KernelCompileError(f"compiling {filename} {name} for sm_90a failed:\n"
                                     f"{nvrtc.getProgramLog(prog)}") from exc
        lowered, cubin = nvrtc.getLoweredName(prog, name), nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    module = cupy.cuda.function.Module()
    module.load(cubin)
    return module, module.get_function(lowered)


@lru_cache(maxsize=1)
def cupy_has_bfloat16() -> bool:
    """Whether this CuPy allocates ``ml_dtypes.bfloat16`` arrays (CuPy >= 14 is expected to)."""
    import cupy

    try:
        cupy.empty(8, dtype=ml_dtypes.bfloat16)
        return True
    except Exception:
        return False


def dt_code(dtype, kv_dtype=None) -> int:
    """The kernels' ``DT`` code of ``dtype`` (``kv_dtype="bfloat16"`` marks uint16 words as bfloat16)."""
    dt = np.dtype(ml_dtypes.bfloat16) if str(kv_dtype) in ("bfloat16", "bf16") else np.dtype(kv_dtype or dtype)
    if dt not in DT_CODES:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dt}")
    return DT_CODES[dt]


@lru_cache(maxsize=None)
def num_sms(device_id: int) -> int:
    import cupy

    return cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


def opt_in_smem(kernel, smem: int, prefer_shared: bool = False) -> None:
    """Allow ``smem`` bytes of dynamic shared memory (above the 48 KB default); with ``prefer_shared`` also ask
    for the largest shared-memory carveout (a persistent grid that counts on every resident block)."""
    import cupy

    if smem > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < smem:
        kernel.max_dynamic_shared_size_bytes = smem
    if prefer_shared:
        try:  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 9: 100 % shared memory
            cupy.cuda.driver.funcSetAttribute(kernel.ptr, 9, 100)
        except Exception:  # noqa: BLE001 - a hint; the occupancy query tells what the launch gets
            pass


def blocks_per_sm(kernel, threads: int, smem: int, device_id: int) -> int:
    """Resident thread blocks of ``threads`` per SM with ``smem`` bytes of dynamic shared memory: the driver's
    occupancy calculator, else its formula from registers, shared memory and threads (less its rounding
    details)."""
    import cupy

    try:
        return max(1, int(cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.ptr, threads, smem)))
    except Exception:  # noqa: BLE001 - the formula below
        attrs = cupy.cuda.Device(device_id).attributes
        by_regs = attrs["MaxRegistersPerMultiprocessor"] // (-(-kernel.num_regs * 32 // 256) * 256 * (threads // 32))
        by_smem = attrs["MaxSharedMemoryPerMultiprocessor"] // (smem + 1024)
        return max(1, min(by_regs, by_smem, attrs["MaxThreadsPerMultiProcessor"] // threads, 32))


def int32_contiguous(a):
    """``a`` as a C-contiguous int32 CuPy array (a copy only when needed): the kernels' index arguments."""
    import cupy

    return cupy.ascontiguousarray(a, dtype=cupy.int32)
