"""CUDA kernels of ``kernels_cu/`` loaded from text with ``cupy.RawModule``, and their thin launchers.

One compiled module per launch and option set (file, kernel version, element type, head_dim, GT, ``-D``
defines), cached for the process (CuPy caches extern "C" modules on disk too; templated ones it recompiles
per process). A compile error raises :class:`KernelCompileError` naming the ``.cu`` file and carrying the
compiler log. Launch arithmetic that needs no GPU (tile shapes, shared memory, the split-K plans) lives in
:mod:`pagedkv.decode_plan`.

The launchers take CuPy arrays already shape/dtype-checked by :mod:`pagedkv.ops`; they check what only
they know (head_dim, block size, contiguity, alignment), run the GPU-side range check (one reduction and
one small device-to-host read, skipped with ``check=False``), pick the launch shape, and launch.

bfloat16: CuPy arrays of ``ml_dtypes.bfloat16`` are used directly when CuPy accepts them; otherwise pass
uint16 views and ``kv_dtype="bfloat16"``; the kernels only see raw 16-bit words either way.

fp8 KV caches (kernels 2, 3 and the default): uint8 pools of raw e4m3/e5m2 bytes with
``kv_dtype="fp8_e4m3"`` (or ``"fp8"``) / ``"fp8_e5m2"`` and per-layer scales ``k_scale`` / ``v_scale``
(stored x = byte value * scale); q and out stay float16/bfloat16.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import ml_dtypes
import numpy as np

from .decode_plan import (MIN_PARTITION_TOKENS, V2_STAGES, V2_THREADS, V2_TILE_BYTES, WAVE_EFFICIENCY,  # noqa: F401
                          choose_num_partitions, group_tile, partition_max_parts, tile_shape, v2_shape,
                          v2_smem_bytes, v3_min_tiles, v3_smem_bytes)

HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 256)  # every multiple of 16 that Llama/Qwen-family models use
VERSIONS = (1, 2, 3)
# None: the default, kernel 3's launch with its on-device dispatcher (mode 0: the balanced walk or the
# partition plan, picked per launch from context_lens; kernels_cu/NOTES.md)
DEFAULT_VERSION = None
MODES = {0: "auto", 2: "partition", 3: "walk"}  # kernel 3's `mode` argument
FP8_KV_DTYPES = {"fp8": 3, "fp8_e4m3": 3, "fp8_e5m2": 4}  # kv_dtype -> cache type code (uint8 caches)
GROUP_TILES = (1, 2, 4, 8)  # query heads per v2/v3 thread block (template parameter GT)
REDUCE_THREADS = 256  # PAGEDKV_REDUCE_THREADS in paged_attention.cu
_U64_MAX = np.iinfo(np.uint64).max
_DT_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(ml_dtypes.bfloat16): 2}


class KernelCompileError(RuntimeError):
    """A ``kernels_cu/*.cu`` file failed to compile; the message holds the file and the compiler log."""


def _cu_dir() -> Path:
    installed = Path(__file__).parent / "kernels_cu"
    return installed if installed.is_dir() else Path(__file__).parent.parent / "kernels_cu"


def cu_source(filename: str) -> str:
    """The text of ``kernels_cu/<filename>`` with ``#include "common.cuh"`` inlined (so the cache key
    covers the header too)."""
    folder = _cu_dir()
    common = (folder / "common.cuh").read_text()
    return (folder / filename).read_text().replace('#include "common.cuh"', common)


@lru_cache(maxsize=None)
def _module(filename: str, name_expressions: tuple[str, ...], defines: tuple[tuple[str, int], ...] = ()):
    import cupy

    options = ("-std=c++17",) + tuple(f"-D{k}={v}" for k, v in defines)
    module = cupy.RawModule(code=cu_source(filename), options=options,
                            name_expressions=list(name_expressions) or None)
    try:
        module.compile()
    except cupy.cuda.compiler.CompileException as exc:
        raise KernelCompileError(f"compiling {_cu_dir() / filename} {options} failed:\n{exc}") from exc
    return module


@lru_cache(maxsize=None)
def _function(filename, name, name_expressions=(), defines=()):
    return _module(filename, tuple(name_expressions), tuple(defines)).get_function(name)


@lru_cache(maxsize=1)
def cupy_has_bfloat16() -> bool:
    """Whether this CuPy allocates ``ml_dtypes.bfloat16`` arrays (CuPy >= 14 is expected to)."""
    import cupy

    try:
        cupy.empty(8, dtype=ml_dtypes.bfloat16)
        return True
    except Exception:
        return False


def _dt_code(dtype, kv_dtype=None) -> int:
    dt = np.dtype(ml_dtypes.bfloat16) if str(kv_dtype) in ("bfloat16", "bf16") else np.dtype(kv_dtype or dtype)
    if dt not in _DT_CODES:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dt}")
    return _DT_CODES[dt]


@lru_cache(maxsize=None)
def num_sms(device_id: int) -> int:
    import cupy

    return cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


def _int32_contiguous(a):
    import cupy

    return cupy.ascontiguousarray(a, dtype=cupy.int32)


# ---- paged attention ------------------------------------------------------------------------------

def _ct_arg(dt: int, ct: int | None) -> str:
    """The cache-type template argument (absent when the cache has q's type: the C++ default)."""
    return "" if ct is None or ct == dt else f", {ct}"


def _attention_names(dt: int, head_dim: int, ct: int | None = None) -> tuple[str, ...]:
    """Every template instantiation of paged_attention.cu for one element type, cache type and head_dim
    (kernel 1 only for a cache of q's type)."""
    c = _ct_arg(dt, ct)
    return ((f"paged_attention_v1_kernel<{dt}, {head_dim}>",) if not c else ()) + (
            *(f"paged_attention_v2_kernel<{dt}, {head_dim}, {gt}{c}>" for gt in GROUP_TILES),
            f"paged_attention_v2_reduce_kernel<{dt}, {head_dim}{c}>",
            *(f"paged_attention_v3_kernel<{dt}, {head_dim}, {gt}{c}>" for gt in GROUP_TILES))


_KERNEL_NAMES = {"v1": "paged_attention_v1_kernel<{dt}, {hd}>",
                 "v2": "paged_attention_v2_kernel<{dt}, {hd}, {gt}{c}>",
                 "reduce": "paged_attention_v2_reduce_kernel<{dt}, {hd}{c}>",
                 "v3": "paged_attention_v3_kernel<{dt}, {hd}, {gt}{c}>"}
_LAUNCH_GROUP = {"v1": ("v1",), "v2": ("v2", "reduce"), "reduce": ("v2", "reduce"), "v3": ("v3",)}


def _attention_kernel(kind: str, dt: int, head_dim: int, gt: int = 0, tile_bytes=V2_TILE_BYTES,
                      stages=V2_STAGES, extra_defines: tuple = (), ct: int | None = None):
    """One kernel of paged_attention.cu. A module holds one launch's kernels (kernel 2 with its merge, or
    kernel 3, for one GT), so a process compiles only the instantiations it launches.

    NOTE: CuPy recompiles a module with name expressions in every process (its disk cache is skipped
    for them); small modules keep that cost to the kernels actually used.
    """
    if kind == "check":  # extern "C", no templates instantiated: this module is disk-cached
        return _function("paged_attention.cu", "check_block_tables_kernel")
    c = _ct_arg(dt, ct)
    names = tuple(_KERNEL_NAMES[k].format(dt=dt, hd=head_dim, gt=gt, c=c) for k in _LAUNCH_GROUP[kind])
    defines = () if kind == "v1" else (("PAGEDKV_V2_TILE_BYTES", tile_bytes), ("PAGEDKV_V2_STAGES", stages),
                                       *extra_defines)
    return _function("paged_attention.cu", _KERNEL_NAMES[kind].format(dt=dt, hd=head_dim, gt=gt, c=c), names,
                     defines)


def check_block_tables(block_tables, context_lens, num_blocks: int, block_size: int) -> None:
    """GPU-side range check: one reduction kernel, then one 16-byte device-to-host read.

    Raises ``ValueError`` for a length outside ``[1, max_blocks * block_size]`` or a used table entry
    outside ``[0, num_blocks)``.
    """
    import cupy

    batch, max_blocks = block_tables.shape
    capacity = max_blocks * block_size
    if max_blocks == 0:
        raise ValueError("block_tables has 0 columns: no context fits")
    bad = cupy.empty(2, dtype=cupy.uint64)
    cupy.cuda.runtime.memsetAsync(bad.data.ptr, 0xFF, bad.nbytes, cupy.cuda.get_current_stream().ptr)  # UINT64_MAX
    total = batch * max_blocks
    grid = min(max(1, -(-total // 256)), 4 * num_sms(cupy.cuda.Device().id))
    _attention_kernel("check", 0, 0)((grid,), (256,), (
        block_tables, context_lens, cupy.int32(batch), cupy.int32(max_blocks), cupy.int32(num_blocks),
        cupy.int32(block_size), bad))
    bad_len, bad_entry = (int(x) for x in bad.get())
    if bad_len != _U64_MAX:
        raise ValueError(f"context_lens[{bad_len}]={int(context_lens[bad_len])} outside [1, {capacity}] "
                         f"(max_blocks * block_size)")
    if bad_entry != _U64_MAX:
        i, j = divmod(bad_entry, max_blocks)
        raise ValueError(f"block_tables[{i}, {j}]={int(block_tables[i, j])} outside [0, {num_blocks})")


@lru_cache(maxsize=None)
def resident_ctas(kernel_key, num_regs: int, smem: int, device_id: int) -> int:
    """Thread blocks of V2_THREADS that fit on the whole GPU at once (registers and shared memory)."""
    import cupy

    attrs = cupy.cuda.Device(device_id).attributes
    regs_per_warp = -(-num_regs * 32 // 256) * 256
    by_regs = attrs["MaxRegistersPerMultiprocessor"] // (regs_per_warp * (V2_THREADS // 32))
    by_smem = attrs["MaxSharedMemoryPerMultiprocessor"] // (smem + 1024)
    by_threads = attrs["MaxThreadsPerMultiProcessor"] // V2_THREADS
    return max(1, min(by_regs, by_smem, by_threads, 32)) * attrs["MultiProcessorCount"]


def _opt_in_smem(kernel, smem: int, prefer_shared: bool = False) -> None:
    """Allow ``smem`` bytes of dynamic shared memory (above the 48 KB default); with ``prefer_shared``
    also ask for the largest shared-memory carveout (kernel 3: its grid counts on every resident block)."""
    import cupy

    if smem > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < smem:
        kernel.max_dynamic_shared_size_bytes = smem
    if prefer_shared:
        try:  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 9: 100 % shared memory
            cupy.cuda.driver.funcSetAttribute(kernel.ptr, 9, 100)
        except Exception:  # noqa: BLE001 - a hint; the occupancy query tells what the launch gets
            pass


def _blocks_per_sm(kernel, smem: int, kernel_key, device_id: int) -> int:
    """Resident thread blocks per SM, from the driver's occupancy calculator (the formula if unavailable)."""
    import cupy

    try:
        return max(1, int(cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.ptr, V2_THREADS, smem)))
    except Exception:  # noqa: BLE001
        return resident_ctas(kernel_key, kernel.num_regs, smem, device_id) // num_sms(device_id)


def _scale_arg(name: str, value) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return x


def cache_types(q_dtype, cache_dtype, kv_dtype=None) -> tuple[int, int]:
    """``(dt, ct)``: the type codes of q/out and of the cache. ``kv_dtype``: None (the cache's own dtype),
    ``"bfloat16"`` (uint16 arrays holding bfloat16 bits) or an fp8 name (:data:`FP8_KV_DTYPES`, uint8 caches
    under float16/bfloat16 q). Raises ``ValueError`` for anything else."""
    name = None if kv_dtype is None else str(kv_dtype)
    cache_dtype = np.dtype(cache_dtype)
    if name in FP8_KV_DTYPES:
        if cache_dtype != np.uint8:
            raise ValueError(f"kv_dtype={name!r} needs a uint8 cache (raw fp8 bytes), got {cache_dtype}")
        dt = _dt_code(q_dtype, "bfloat16" if np.dtype(q_dtype) == np.uint16 else None)
        if dt == 0:
            raise ValueError("fp8 KV caches need float16 or bfloat16 queries, got float32")
        return dt, FP8_KV_DTYPES[name]
    if cache_dtype == np.uint8:
        raise ValueError(f"a uint8 cache holds fp8 bytes: pass kv_dtype= one of {sorted(FP8_KV_DTYPES)} "
                         f"(got kv_dtype={kv_dtype!r})")
    if name not in (None, "bfloat16", "bf16"):
        raise ValueError(f"kv_dtype must be None, 'bfloat16' or one of {sorted(FP8_KV_DTYPES)}, got {kv_dtype!r}")
    dt = _dt_code(q_dtype, kv_dtype)
    return dt, dt


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, *, scale=None, version=None, out=None,
                    check=True, kv_dtype=None, k_scale=1.0, v_scale=1.0, num_partitions=None, num_ctas=None,
                    min_tiles=None, mode=None, group_tile=None, tile_bytes=V2_TILE_BYTES, stages=V2_STAGES,
                    extra_defines: tuple = ()):
    """Launch paged decode attention (see :func:`pagedkv.ops.paged_attention` for shapes).

    ``version``: 1, 2, 3 or None (default: kernel 3's launch with its dispatcher, which picks the balanced
    walk or the partition plan on the device from ``context_lens``, so a captured graph chooses again at
    every replay). Kernel 2: ``num_partitions`` forces the split-K count (default: :func:`choose_num_partitions`).
    Kernel 3 and the default: ``num_ctas`` forces the grid (default: the resident thread blocks of the device),
    ``min_tiles`` the fewest tiles per block of the walk (default :func:`v3_min_tiles`); small values force
    splits and merges on small inputs (tests). ``mode`` (tests, benchmarks) forces kernel 3's path: 0 the
    dispatcher (the default's), 2 the partition plan, 3 the walk (version 3's); ``group_tile`` forces kernel 3's
    query heads per block (one of :data:`GROUP_TILES`; default :func:`group_tile` of the group).
    ``kv_dtype``/``k_scale``/``v_scale``: an fp8 cache (uint8, :data:`FP8_KV_DTYPES`) and its per-layer scales
    (finite, > 0; stored x = byte value * scale); kernel 1 refuses fp8.
    ``tile_bytes`` / ``stages`` / ``extra_defines`` (e.g. ``(("PAGEDKV_V2_BUTTERFLY", 0),)``) pick a
    compile-time variant of kernels 2 and 3 (benchmarks). Every launch shape depends on shapes only, so a
    captured CUDA graph replays correctly with new ``context_lens`` and ``block_tables`` values.
    """
    import cupy

    num_blocks, num_kv_heads, block_size, head_dim = k_cache.shape
    batch, num_qo_heads, _ = q.shape
    dt, ct = cache_types(q.dtype, k_cache.dtype, kv_dtype)
    k_scale, v_scale = _scale_arg("k_scale", k_scale), _scale_arg("v_scale", v_scale)
    if version is not None and version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS} or None (the dispatcher), got {version!r}")
    if version == 1 and ct != dt:
        raise ValueError(f"kernel 1 reads float16/bfloat16/float32 caches only, not kv_dtype={kv_dtype!r}: use "
                         f"version 2, 3 or None")
    if mode is not None and (mode not in MODES or version in (1, 2)):
        raise ValueError(f"mode must be one of {sorted(MODES)} with version 3 or None, got mode={mode!r} "
                         f"version={version!r}")
    if group_tile is not None and (group_tile not in GROUP_TILES or version in (1, 2)):
        raise ValueError(f"group_tile must be one of {GROUP_TILES} with version 3 or None, got {group_tile!r}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if block_size < 1 or block_size & (block_size - 1) or block_size > 1024:
        raise ValueError(f"block_size must be a power of two in [1, 1024], got {block_size}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not c.flags.c_contiguous or c.data.ptr % 16:
            raise ValueError(f"{name} must be C-contiguous and 16-byte aligned")
    if num_ctas is not None and num_ctas < 1:
        raise ValueError(f"num_ctas must be >= 1, got {num_ctas}")
    q = cupy.ascontiguousarray(q)
    if q.data.ptr % 16:
        q = q.copy()
    block_tables, context_lens = _int32_contiguous(block_tables), _int32_contiguous(context_lens)
    if out is None:
        out = cupy.empty(q.shape, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous {q.shape} {q.dtype}, got {out.shape} {out.dtype}")
    if batch == 0:
        if check:
            check_block_tables(block_tables, context_lens, num_blocks, block_size)
        return out
    scale = head_dim**-0.5 if scale is None else float(scale)
    scales = (k_scale, v_scale)
    if version == 1:
        launch = _prepare_v1(out, q, k_cache, v_cache, block_tables, context_lens, scale, dt)
    elif version == 2:
        launch = _prepare_v2(out, q, k_cache, v_cache, block_tables, context_lens, scale, dt, num_partitions,
                             tile_bytes, stages, extra_defines, ct, scales)
    else:
        mode = (3 if version == 3 else 0) if mode is None else mode
        launch = _prepare_v3(out, q, k_cache, v_cache, block_tables, context_lens, scale, dt, num_ctas, min_tiles,
                             tile_bytes, stages, extra_defines, ct, scales, mode, group_tile)
    # NOTE: the range check makes the host wait for the GPU, so every host-side step of the launch (plan,
    # scratch buffers) is done before it: only the launch itself follows the wait.
    if check:
        check_block_tables(block_tables, context_lens, num_blocks, block_size)
    launch()
    return out


def _prepare_v1(out, q, k_cache, v_cache, block_tables, context_lens, scale, dt):
    """Kernel 1's launch as a closure (scratch logits allocated now)."""
    import cupy

    _, num_kv_heads, block_size, head_dim = k_cache.shape
    batch, num_qo_heads, _ = q.shape
    max_blocks = block_tables.shape[1]
    logits = cupy.empty((batch, num_qo_heads, max_blocks * block_size), dtype=cupy.float32)
    kernel = _attention_kernel("v1", dt, head_dim)
    args = (out, logits, q, k_cache, v_cache, block_tables, context_lens, cupy.int32(num_qo_heads),
            cupy.int32(num_kv_heads), cupy.int32(block_size.bit_length() - 1), cupy.int32(max_blocks),
            cupy.float32(scale))
    return lambda: kernel((num_qo_heads, batch), (128,), args)


def v2_launch_plan(q_shape, cache_shape, max_blocks: int, dt: int, num_partitions=None,
                   tile_bytes=V2_TILE_BYTES, stages=V2_STAGES, extra_defines: tuple = (), ct: int | None = None) -> dict:
    """How kernel 2 will be launched: group tile, split-K partitions, shared memory (compiles if needed).

    Cached per shape and device: the engine asks for the same plan every layer of every step.
    ``ct``: the cache type code (default: q's, ``dt``).
    """
    import cupy

    return dict(_v2_plan(tuple(q_shape), tuple(cache_shape), int(max_blocks), dt, num_partitions, tile_bytes, stages,
                         tuple(extra_defines), dt if ct is None else ct, cupy.cuda.Device().id))


@lru_cache(maxsize=4096)
def _v2_plan(q_shape, cache_shape, max_blocks, dt, num_partitions, tile_bytes, stages, extra_defines, ct, device_id):
    batch, num_qo_heads, _ = q_shape
    _, num_kv_heads, block_size, head_dim = cache_shape
    group = num_qo_heads // num_kv_heads
    gt = group_tile(group)
    q_tiles = -(-group // gt)
    tile_tokens = tile_shape(ct, head_dim, tile_bytes)["tile_tokens"]
    max_context = max_blocks * block_size
    kernel = _attention_kernel("v2", dt, head_dim, gt, tile_bytes, stages, extra_defines, ct)
    smem = v2_smem_bytes(ct, head_dim, gt, tile_bytes, stages)
    _opt_in_smem(kernel, smem)
    key = ("v2", dt, ct, head_dim, gt, tile_bytes, stages, extra_defines)
    resident = _blocks_per_sm(kernel, smem, key, device_id) * num_sms(device_id)
    if num_partitions is None:
        parts, part_tokens = choose_num_partitions(batch, num_kv_heads * q_tiles, max_context, tile_tokens,
                                                   resident)
    else:
        part_tokens = -(-(-(-max_context // num_partitions)) // tile_tokens) * tile_tokens
        parts = -(-max_context // part_tokens)
    return {"kernel": kernel, "group": group, "gt": gt, "q_tiles": q_tiles, "parts": parts,
            "part_tokens": part_tokens, "smem": smem, "resident_ctas": resident, "num_regs": kernel.num_regs,
            "reduce": None if parts == 1 else _attention_kernel("reduce", dt, head_dim, gt, tile_bytes, stages,
                                                                extra_defines, ct)}


def _prepare_v2(out, q, k_cache, v_cache, block_tables, context_lens, scale, dt, num_partitions,
                tile_bytes, stages, extra_defines=(), ct=None, scales=(1.0, 1.0)):
    """Kernel 2's launch (and the split-K merge when the plan splits) as a closure."""
    import cupy

    _, num_kv_heads, block_size, head_dim = k_cache.shape
    batch, num_qo_heads, _ = q.shape
    max_blocks = block_tables.shape[1]
    plan = v2_launch_plan(q.shape, k_cache.shape, max_blocks, dt, num_partitions, tile_bytes, stages,
                          extra_defines, ct)
    parts = plan["parts"]
    if parts == 1:
        part_out = part_max = part_sum = cupy.empty(1, dtype=cupy.float32)
    else:
        part_out = cupy.empty((batch, num_qo_heads, parts, head_dim), dtype=cupy.float32)
        part_max = cupy.empty((batch, num_qo_heads, parts), dtype=cupy.float32)
        part_sum = cupy.empty((batch, num_qo_heads, parts), dtype=cupy.float32)
    k_scale, v_scale = (cupy.float32(x) for x in scales)
    main_args = (out, part_out, part_max, part_sum, q, k_cache, v_cache, block_tables, context_lens,
                 cupy.int32(num_qo_heads), cupy.int32(num_kv_heads), cupy.int32(plan["group"]),
                 cupy.int32(block_size.bit_length() - 1), cupy.int32(max_blocks), cupy.int32(plan["part_tokens"]),
                 cupy.float32(scale * math.log2(math.e)), k_scale, v_scale)
    grid = (parts, num_kv_heads * plan["q_tiles"], batch)
    if parts == 1:
        return lambda: plan["kernel"](grid, (V2_THREADS,), main_args, shared_mem=plan["smem"])
    reduce = plan["reduce"]
    reduce_args = (out, part_out, part_max, part_sum, context_lens, cupy.int32(num_qo_heads), cupy.int32(parts),
                   cupy.int32(plan["part_tokens"]), v_scale)

    def launch():
        plan["kernel"](grid, (V2_THREADS,), main_args, shared_mem=plan["smem"])
        reduce((num_qo_heads, batch), (REDUCE_THREADS,), reduce_args, shared_mem=4 * parts)
    return launch


def v3_launch_plan(q_shape, cache_shape, dt: int, num_ctas=None, min_tiles=None, tile_bytes=V2_TILE_BYTES,
                   stages=V2_STAGES, extra_defines: tuple = (), ct: int | None = None, max_blocks: int = 0,
                   gt: int | None = None) -> dict:
    """How kernel 3 (and the default) will be launched: group tile, grid (resident blocks), min tiles, shared
    memory, the partition plan's bound on partitions (``max_parts``, from the table's ``max_blocks``), the
    counters (``[4 + max(grid, batch * head groups)]`` int32: queue, blocks done, the last choice, spare, then
    the merge counters).

    Depends on shapes and the device only: the batch's lengths are planned on the device.
    """
    import cupy

    return dict(_v3_plan(tuple(q_shape), tuple(cache_shape), dt, num_ctas, min_tiles, tile_bytes, stages,
                         tuple(extra_defines), dt if ct is None else ct, int(max_blocks), gt, cupy.cuda.Device().id))


@lru_cache(maxsize=4096)
def _v3_plan(q_shape, cache_shape, dt, num_ctas, min_tiles, tile_bytes, stages, extra_defines, ct, max_blocks,
             gt, device_id):
    batch, num_qo_heads, _ = q_shape
    _, num_kv_heads, block_size, head_dim = cache_shape
    group = num_qo_heads // num_kv_heads
    gt = group_tile(group) if gt is None else gt
    kernel = _attention_kernel("v3", dt, head_dim, gt, tile_bytes, stages, extra_defines, ct)
    smem = v3_smem_bytes(ct, head_dim, gt, tile_bytes, stages)
    _opt_in_smem(kernel, smem, prefer_shared=True)
    per_sm = _blocks_per_sm(kernel, smem, ("v3", dt, ct, head_dim, gt, tile_bytes, stages, extra_defines), device_id)
    tile_tokens = tile_shape(ct, head_dim, tile_bytes)["tile_tokens"]
    ctas = num_ctas or per_sm * num_sms(device_id)
    q_tiles = -(-group // gt)
    items0 = batch * num_kv_heads * q_tiles
    max_parts = partition_max_parts(items0, ctas, max_blocks * block_size)
    return {"kernel": kernel, "group": group, "gt": gt, "q_tiles": q_tiles, "smem": smem,
            "blocks_per_sm": per_sm, "ctas": ctas, "tile_tokens": tile_tokens,
            "min_tiles": v3_min_tiles(tile_tokens) if min_tiles is None else max(1, int(min_tiles)),
            "num_regs": kernel.num_regs, "max_parts": max_parts,
            "slots": max(2 * ctas, items0 * max_parts),
            "counters": _split_counters(4 + max(ctas, items0), device_id)}


@lru_cache(maxsize=None)
def _split_counters(size: int, device_id: int):
    """Kernel 3's counters: ``[size]`` int32, zeroed once here; every launch leaves them zero (but entry 2,
    the last launch's choice: ``mode | parts << 8``).

    NOTE: allocated with cudaMalloc outside any memory pool (a CUDA graph's private pool, say), so it
    lives as long as the process; launches of kernel 3 with the same counter size on two streams at the
    same time would share it (not supported; the engine runs one stream).
    """
    import cupy

    nbytes = 4 * size
    memory = cupy.cuda.Memory(nbytes)
    cupy.cuda.runtime.memset(memory.ptr, 0, nbytes)
    return cupy.ndarray((size,), dtype=cupy.int32, memptr=cupy.cuda.MemoryPointer(memory, 0))


def last_dispatch(q_shape, cache_shape, dt: int, ct: int | None = None, max_blocks: int = 0, num_ctas=None,
                  gt: int | None = None) -> dict:
    """What the last kernel-3 launch of this shape chose on the device (tests, benchmarks; reads the GPU):
    ``{"mode": 2 (partition plan) or 3 (walk), "parts": partitions of the partition plan}``."""
    plan = v3_launch_plan(q_shape, cache_shape, dt, num_ctas, ct=ct, max_blocks=max_blocks, gt=gt)
    word = int(plan["counters"][2].get())
    return {"mode": word & 0xFF, "parts": word >> 8}


def _prepare_v3(out, q, k_cache, v_cache, block_tables, context_lens, scale, dt, num_ctas, min_tiles, tile_bytes,
                stages, extra_defines=(), ct=None, scales=(1.0, 1.0), mode=0, gt=None):
    """Kernel 3 (persistent, planned on the device: the balanced walk or the partition plan, split sequences
    merged in-kernel) as a closure."""
    import cupy

    _, num_kv_heads, block_size, head_dim = k_cache.shape
    batch, num_qo_heads, _ = q.shape
    max_blocks = block_tables.shape[1]
    plan = v3_launch_plan(q.shape, k_cache.shape, dt, num_ctas, min_tiles, tile_bytes, stages, extra_defines, ct,
                          max_blocks, gt)
    ctas, gt = plan["ctas"], plan["gt"]
    part_out = cupy.empty((plan["slots"], gt, head_dim), dtype=cupy.float32)  # walk: slot 2b + (piece starts)
    part_ml = cupy.empty((plan["slots"], gt, 2), dtype=cupy.float32)
    args = (out, part_out, part_ml, plan["counters"], q, k_cache, v_cache, block_tables, context_lens,
            cupy.int32(batch), cupy.int32(num_qo_heads), cupy.int32(num_kv_heads), cupy.int32(plan["group"]),
            cupy.int32(block_size.bit_length() - 1), cupy.int32(max_blocks),
            cupy.int32(plan["min_tiles"]), cupy.float32(scale * math.log2(math.e)), cupy.float32(scales[0]),
            cupy.float32(scales[1]), cupy.int32(mode), cupy.int32(plan["max_parts"]))
    return lambda: plan["kernel"]((ctas,), (V2_THREADS,), args, shared_mem=plan["smem"])


# ---- RMSNorm (the model's fused ops) ---------------------------------------------------------------

NORM_THREADS = 256  # PAGEDKV_NORM_THREADS in rms_norm.cu
_NORM_SUFFIX = {0: "f32", 1: "f16", 2: "bf16"}


def rms_norm_kernel(dtype):
    """The ``rms_norm_<f32|f16|bf16>`` kernel of ``kernels_cu/rms_norm.cu`` for ``dtype``."""
    return _function("rms_norm.cu", f"rms_norm_{_NORM_SUFFIX[_dt_code(dtype)]}")


# ---- cache ops ------------------------------------------------------------------------------------

def _cache_kernel(name: str):
    return _function("cache_ops.cu", name)


def _word_bytes(row_bytes: int, arrays) -> int:
    """The widest word (16, 4 or 2 bytes) dividing a row and every array's start address."""
    for w in (16, 4, 2):
        if row_bytes % w == 0 and all(a.data.ptr % w == 0 for a in arrays):
            return w
    raise ValueError(f"rows of {row_bytes} bytes cannot be copied in 2-byte words")


def check_index_range(ids, lo: int, hi: int, name: str) -> None:
    """GPU-side: raise ``ValueError`` naming the first entry of int64 ``ids`` outside ``[lo, hi)``."""
    import cupy

    n = ids.size
    if n == 0:
        return
    bad = cupy.full(1, _U64_MAX, dtype=cupy.uint64)
    grid = min(-(-n // 256), 4 * num_sms(cupy.cuda.Device().id))
    _cache_kernel("check_index_kernel")((grid,), (256,), (ids, cupy.int64(n), cupy.int64(lo), cupy.int64(hi), bad))
    i = int(bad.get()[0])
    if i != _U64_MAX:
        raise ValueError(f"{name}[{i}]={int(ids[i])} outside [{lo}, {hi})")


def write_kv(k, v, k_cache, v_cache, slot_mapping, *, check=True):
    """Write K/V rows into their slots (see :func:`pagedkv.ops.write_kv`).

    With ``check`` the slot range is verified on the GPU; duplicate slots are *not* detected on the GPU
    (the caller's contract; the host path checks them).
    """
    import cupy

    num_blocks, num_kv_heads, block_size, head_dim = k_cache.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not c.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
    k, v = cupy.ascontiguousarray(k), cupy.ascontiguousarray(v)
    slots = cupy.ascontiguousarray(slot_mapping, dtype=cupy.int64)
    if check:
        check_index_range(slots, -1, num_blocks * block_size, "slot_mapping")
    if slots.size == 0:
        return
    word = _word_bytes(head_dim * k_cache.itemsize, (k, v, k_cache, v_cache))
    _cache_kernel(f"write_kv_w{word}")((slots.size,), (128,), (
        k_cache, v_cache, k, v, slots, cupy.int32(num_kv_heads), cupy.int32(block_size),
        cupy.int32(head_dim * k_cache.itemsize // word)))


def copy_blocks(k_pool, v_pool, src_block_ids, dst_block_ids, *, check=True):
    """``pool[:, dst[i]] = pool[:, src[i]]`` for K and V, every layer, one launch.

    With ``check`` the (few) ids are read back once and checked on the host: ranges, distinct
    destinations, no id both a source and a destination.
    """
    import cupy

    from .ops import check_copy_ranges_host

    num_layers, num_blocks = k_pool.shape[:2]
    src = cupy.ascontiguousarray(src_block_ids, dtype=cupy.int64)
    dst = cupy.ascontiguousarray(dst_block_ids, dtype=cupy.int64)
    if check:
        ids = cupy.concatenate([src, dst]).get()
        check_copy_ranges_host(ids[: src.size], ids[src.size:], num_blocks)
    if src.size == 0 or num_layers == 0:
        return
    block_bytes = math.prod(k_pool.shape[2:]) * k_pool.itemsize
    word = _word_bytes(block_bytes, (k_pool, v_pool))
    _cache_kernel(f"copy_blocks_w{word}")((src.size, num_layers, 2), (256,), (
        k_pool, v_pool, src, dst, cupy.int64(num_blocks), cupy.int64(block_bytes // word)))
