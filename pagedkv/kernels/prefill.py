"""Launchers of ``kernels_cu/prefill_attention.cu``: causal prefill attention over the paged KV cache.

Version 1 runs on CUDA cores for every dtype (the float32 path, and a GPU oracle); version 2 runs on tensor
cores (mma.sync) for float16 / bfloat16 (their default off Hopper, and the fallback); version 3 (wgmma,
sm_90a, head_dim 64 / 128) is opt-in: correct, but slower than version 2 on the benchmark
(kernels_cu/NOTES_prefill.md); versions 4 and 5 (prefill_sm90: warp-specialized wgmma,
FlashAttention-3 structure) are the default on compute capability 9.0 for float16 / bfloat16 at head_dim 64 /
128 (dispatch: :func:`default_version`). All take arrays already shape/dtype-checked by
:func:`pagedkv.kernels.ops.prefill_attention`; here we check what only the launcher knows (head_dim, block size,
contiguity, alignment), run the GPU-side range check (one small kernel and one 24-byte read, skipped with
``check=False``), work out the launch shape and launch.

The launch shape depends on array shapes only, never on device values, so a launch can be captured in a
CUDA graph and replayed with new lengths: version 2 launches the plan kernel (one block) and
``capacity(...) * num_kv_heads`` blocks; version 1 launches ``(num_tokens, num_qo_heads)`` blocks.

Modules are loaded and cached by :mod:`pagedkv.kernels.compile` (version 3 through its sm_90a NVRTC path).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from ..fp8 import FP8_CODES, check_device_supports_fp8, check_kv_dtype, check_scale
from . import cache_ops
from . import prefill_sm90 as sm90
from .compile import U64_MAX, dt_code, int32_contiguous, load_function, load_sm90a, num_sms

FILENAME = "prefill_attention.cu"
HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 256)
VERSIONS = (1, 2, 3, 4, 5)  # 4, 5: prefill_sm90 (Hopper, the default where they run)
V1_THREADS = 128  # PAGEDKV_PREFILL_V1_THREADS
V3_HEAD_DIMS = (64, 128)  # version 3 (wgmma, sm_90a): two warpgroups of 64 rows, 64-key tiles, 4 stages
V3_THREADS, V3_BLOCK_M, V3_BLOCK_N, V3_STAGES = 256, 128, 64, 4
PLAN_THREADS = 1024  # PAGEDKV_PLAN_THREADS
FP8_UNIT = {1: 256.0}  # e4m3 tiles hold value * 2^-8 (prefill_attention.cu: fp8x4_to_16); folded into the scales
CHECK_THREADS = 256


@dataclass(frozen=True, slots=True)
class TileConfig:
    """Version 2's thread-block shape (the template parameters after DT and HEAD_DIM).

    ``num_warps`` warps of ``16 * m_tiles`` GQA-packed query rows each walk K/V tiles of ``block_n`` keys held
    in a ``stages``-deep cp.async pipeline.
    """

    num_warps: int
    m_tiles: int
    block_n: int
    stages: int

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    @property
    def block_m(self) -> int:
        return 16 * self.m_tiles * self.num_warps

    def smem_bytes(self, head_dim: int, fp8: bool = False) -> int:
        """Mirror of ``V2::SMEM_BYTES``: Q tile, K and V stages (rows padded by 8 elements), row offsets; with
        ``fp8`` of ``V2::SMEM_BYTES_FP8``: Q tile, one converted K and V tile, the raw fp8 stages, row offsets."""
        row = (head_dim + 8) * 2
        if fp8:
            return ((self.block_m + 2 * self.block_n) * row + 2 * self.stages * self.block_n * head_dim
                    + self.stages * self.block_n * 8)
        return (self.block_m + 2 * self.stages * self.block_n) * row + self.stages * self.block_n * 8

    def kernel_name(self, dt: int, head_dim: int, fmt: int = 0) -> str:
        """The instantiation for element type ``dt``; ``fmt`` 1 / 2: the fp8 (e4m3 / e5m2) cache kernel."""
        tail = f"{head_dim}, {self.num_warps}, {self.m_tiles}, {self.block_n}, {self.stages}>"
        return f"prefill_attention_v2_fp8_kernel<{dt}, {fmt}, {tail}" if fmt else \
            f"prefill_attention_v2_kernel<{dt}, {tail}"

    @property
    def label(self) -> str:
        return f"w{self.num_warps}m{self.m_tiles}n{self.block_n}s{self.stages}"


# NOTE: 4 warps x 32 rows (FlashAttention-2's 128 x 64 tile) where ptxas fits it in 255 registers without
# spilling; 4 warps x 16 rows where it does not (96, 160+). 192 and 256 use 32-key tiles so that two blocks
# fit an H100 SM's shared memory. Measurements: kernels_cu/NOTES_prefill.md.
DEFAULT_CONFIGS: dict[int, TileConfig] = {
    32: TileConfig(4, 2, 64, 2), 64: TileConfig(4, 2, 64, 2), 80: TileConfig(4, 2, 64, 2),
    96: TileConfig(4, 1, 64, 2), 112: TileConfig(4, 2, 64, 2), 128: TileConfig(4, 2, 64, 2),
    160: TileConfig(4, 1, 64, 2), 192: TileConfig(4, 1, 32, 2), 256: TileConfig(4, 1, 32, 2),
}
# alternatives timed by experiments/prefill_bench.py beside the default (head_dim 64 and 128): a tile shape,
# and the default tile compiled with -D overrides: (label, config or None for the default, defines)
BENCH_CONFIGS: tuple[TileConfig, ...] = (TileConfig(8, 1, 64, 2),)
BENCH_DEFINES: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()


def capacity(num_tokens: int, num_seqs: int, group: int, block_m: int) -> int:
    """Work items version 2 launches per KV head: an upper bound on ``sum_i ceil(n_i * group / block_m)``
    over every batch with ``sum_i n_i <= num_tokens`` (each sequence adds at most one partial tile)."""
    return -(-num_tokens * group // block_m) + num_seqs


def v1_names(dt: int, head_dim: int) -> tuple[str, ...]:
    return (f"prefill_attention_v1_kernel<{dt}, {head_dim}>",)


def launched_names(dt: int, head_dim: int) -> tuple[str, ...]:
    """Every template instantiation the launcher may launch for (dt, head_dim) (the compile test's list)."""
    names = v1_names(dt, head_dim)
    if dt != 0:
        configs = (DEFAULT_CONFIGS[head_dim], *(BENCH_CONFIGS if head_dim in (64, 128) else ()))
        names += tuple(c.kernel_name(dt, head_dim) for c in configs)
    return names


def v3_names() -> tuple[str, ...]:
    """Version 3's instantiations (built for sm_90a only)."""
    return tuple(f"prefill_attention_v3_kernel<{dt}, {hd}>" for dt in (1, 2) for hd in V3_HEAD_DIMS)


def _v2_kernel(dt: int, head_dim: int, config: TileConfig, defines: tuple = (), fmt: int = 0):
    name = config.kernel_name(dt, head_dim, fmt)
    kernel = load_function(FILENAME, name, (name,), tuple(defines))
    smem = config.smem_bytes(head_dim, fmt != 0)
    if smem > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < smem:
        kernel.max_dynamic_shared_size_bytes = smem  # opt in above the 48 KB default
    return kernel


def _v1_kernel(dt: int, head_dim: int):
    return load_function(FILENAME, v1_names(dt, head_dim)[0], v1_names(dt, head_dim))


def _plain_kernel(name: str):
    """The extern "C" kernels (plan, check): a module without template instantiations compiles fast."""
    return load_function(FILENAME, name)


def v3_smem_bytes(head_dim: int) -> int:
    """Mirror of ``PAGEDKV_V3_SMEM_BYTES``: Q tile, the K and V stages, row offsets."""
    return (V3_BLOCK_M + 2 * V3_STAGES * V3_BLOCK_N) * head_dim * 2 + V3_STAGES * V3_BLOCK_N * 8


@lru_cache(maxsize=None)
def v3_available(device_id: int) -> bool:
    """Version 3 needs compute capability 9.0 (H100 / H200): wgmma is an sm_90a instruction."""
    import cupy

    return cupy.cuda.Device(device_id).compute_capability == "90"


@lru_cache(maxsize=None)
def _v3_kernel(dt: int, head_dim: int, device_id: int, defines: tuple = ()):
    """Version 3 compiled for sm_90a (:func:`pagedkv.kernels.compile.load_sm90a`): ``(module, function)``."""
    import cupy

    module, function = load_sm90a(FILENAME, f"prefill_attention_v3_kernel<{dt}, {head_dim}>", tuple(defines))
    cupy.cuda.driver.funcSetAttribute(function.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                      v3_smem_bytes(head_dim))
    return module, function


def default_version(dt: int, head_dim: int, device_id: int) -> int:
    """The version run when none is named: the Hopper kernel where one supports the case (5 at head_dim 64, 4
    at 128: :data:`prefill_sm90.DEFAULT_VERSION`), else 2 on tensor cores (16-bit dtypes), 1 for
    float32."""
    if dt == 0:
        return 1
    return sm90.DEFAULT_VERSION[head_dim] if sm90.supports(dt, head_dim, device_id) else 2


def check_ranges(block_tables, query_start_loc, context_lens, num_blocks: int, block_size: int,
                 num_tokens: int) -> None:
    """GPU-side range check: one kernel, then one 24-byte device-to-host read.

    Raises ``ValueError`` for ``query_start_loc`` not non-decreasing from >= 0 to <= num_tokens, a length
    outside ``[n_i, max_blocks * block_size]``, or a used table entry outside ``[0, num_blocks)``.
    """
    import cupy

    num_seqs, max_blocks = block_tables.shape
    bad = cupy.empty(3, dtype=cupy.uint64)
    cupy.cuda.runtime.memsetAsync(bad.data.ptr, 0xFF, bad.nbytes, cupy.cuda.get_current_stream().ptr)
    work = num_seqs * max_blocks + num_seqs + 1
    grid = min(max(1, -(-work // CHECK_THREADS)), 4 * num_sms(cupy.cuda.Device().id))
    _plain_kernel("prefill_check_kernel")((grid,), (CHECK_THREADS,), (
        query_start_loc, context_lens, block_tables, cupy.int32(num_seqs), cupy.int32(max_blocks),
        cupy.int32(num_blocks), cupy.int32(block_size.bit_length() - 1), cupy.int32(num_tokens), bad))
    bad_start, bad_len, bad_entry = (int(x) for x in bad.get())
    if bad_start != U64_MAX:
        raise ValueError(f"query_start_loc[{bad_start}]={int(query_start_loc[bad_start])}: query_start_loc must be "
                         f"non-decreasing, from >= 0 to <= num_tokens={num_tokens}")
    if bad_len != U64_MAX:
        n = int(query_start_loc[bad_len + 1]) - int(query_start_loc[bad_len])
        raise ValueError(f"context_lens[{bad_len}]={int(context_lens[bad_len])} outside [{n}, "
                         f"{max_blocks * block_size}] (its new tokens .. max_blocks * block_size)")
    if bad_entry != U64_MAX:
        i, j = divmod(bad_entry, max_blocks)
        raise ValueError(f"block_tables[{i}, {j}]={int(block_tables[i, j])} outside [0, {num_blocks})")


def prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, *, scale=None, out=None,
                      check=True, version=None, kv_dtype=None, config: TileConfig | None = None,
                      defines: tuple = (), k_scale: float = 1.0, v_scale: float = 1.0):
    """Launch causal prefill attention (see :func:`pagedkv.kernels.ops.prefill_attention` for shapes).

    ``version``: 1 (CUDA cores), 2 (tensor cores, mma.sync; float16/bfloat16), 3 (wgmma on sm_90, head_dim
    64/128, float16/bfloat16), 4 or 5 (warp-specialized wgmma on sm_90, the same cases: prefill_sm90);
    default :func:`default_version` (4 or 5 where they run, else 2 for 16-bit dtypes, 1 for float32). ``config``
    picks a version-2 tile shape (default :data:`DEFAULT_CONFIGS`) and ``defines`` the ``-D`` compile-time
    options of version 2, 3, 4 or 5,
    e.g. ``(("PAGEDKV_PREFILL_LAZY_RESCALE", 0),)`` (benchmarks).
    ``kv_dtype="bfloat16"`` marks uint16 arrays as bfloat16 bits (a CuPy without a bfloat16 dtype).
    ``kv_dtype="fp8_e4m3" | "fp8_e5m2"``: uint8 caches of fp8 bytes read back as ``byte * k_scale`` (V:
    ``v_scale``), q float16 / bfloat16 (a GPU of compute capability >= 8.9): versions 4 / 5 on sm_90 read a
    16-bit copy of the blocks the batch reads, gathered first (:func:`_prepare_sm90_fp8`; the default there while
    :data:`FP8_HOPPER_DEFAULT`); version 2 converts the fp8 tiles as it loads them (the default elsewhere, and
    past :data:`FP8_GATHER_LIMIT`: :func:`fp8_default_version`).
    ``out`` None: a zeroed array (rows no sequence owns stay 0); else only owned rows are written.
    """
    import cupy

    num_blocks, _, block_size, head_dim = k_cache.shape
    fmt = FP8_CODES[check_kv_dtype(kv_dtype)] if kv_dtype not in (None, "bfloat16", "bf16") else 0
    dt = dt_code(q.dtype, None if fmt else kv_dtype)
    if fmt and (dt == 0 or version not in (None, 2, *sm90.VERSIONS) or k_cache.dtype != cupy.uint8
                or v_cache.dtype != cupy.uint8):
        raise ValueError(f"an fp8 cache ({kv_dtype}) runs version 2, 4 or 5 with uint8 caches and float16 / bfloat16 "
                         f"q, got version {version}, q {q.dtype}, caches {k_cache.dtype}")
    k_scale, v_scale = (check_scale("k_scale", k_scale), check_scale("v_scale", v_scale)) if fmt else (1.0, 1.0)
    if fmt:
        check_device_supports_fp8(cupy.cuda.Device().compute_capability)
        if version is None:
            version = fp8_default_version(dt, head_dim, block_tables.shape, k_cache.shape, cupy.cuda.Device().id)
    version = default_version(dt, head_dim, cupy.cuda.Device().id) if version is None else version
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    if version >= 2 and dt == 0:
        raise ValueError(f"version {version} (tensor cores) needs float16 or bfloat16; float32 runs version 1")
    if version == 3 and (head_dim not in V3_HEAD_DIMS or not v3_available(cupy.cuda.Device().id)):
        raise ValueError(f"version 3 needs head_dim in {V3_HEAD_DIMS} and a compute capability 9.0 GPU, got "
                         f"head_dim {head_dim} on {cupy.cuda.Device().compute_capability}")
    if version in sm90.VERSIONS and not sm90.supports(dt, head_dim, cupy.cuda.Device().id):
        raise ValueError(f"version {version} needs float16 / bfloat16, head_dim in {sm90.HEAD_DIMS} and a compute "
                         f"capability 9.0 GPU, got head_dim {head_dim} on {cupy.cuda.Device().compute_capability}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if block_tables.shape[0] and block_tables.shape[1] == 0:
        raise ValueError("block_tables has 0 columns: no context fits")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not c.flags.c_contiguous or c.data.ptr % 16:
            raise ValueError(f"{name} must be C-contiguous and 16-byte aligned")
    q = cupy.ascontiguousarray(q)
    if q.data.ptr % 16:
        q = q.copy()
    if out is None:
        out = cupy.zeros(q.shape, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.flags.c_contiguous or out.data.ptr % 16:
        raise ValueError(f"out must be C-contiguous, 16-byte aligned {q.shape} {q.dtype}, got {out.shape} {out.dtype}")
    tables, starts, lens = (int32_contiguous(a) for a in (block_tables, query_start_loc, context_lens))
    scale = head_dim**-0.5 if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    if version == 1:
        launch = _prepare_v1(out, q, k_cache, v_cache, tables, starts, lens, scale, dt)
    elif version in sm90.VERSIONS and fmt:
        launch = _prepare_sm90_fp8(version, out, q, k_cache, v_cache, tables, starts, lens, scale, dt, defines,
                                   kv_dtype, k_scale, v_scale)
    elif version in sm90.VERSIONS:
        launch = sm90.prepare(version, out, q, k_cache, v_cache, tables, starts, lens, scale, dt,
                              _plain_kernel("prefill_plan_kernel"), capacity, defines)
    elif version == 3:
        launch = _prepare_v3(out, q, k_cache, v_cache, tables, starts, lens, scale, dt, defines)
    else:
        launch = _prepare_v2(out, q, k_cache, v_cache, tables, starts, lens, scale, dt,
                             config or DEFAULT_CONFIGS[head_dim], defines, fmt, k_scale, v_scale)
    # NOTE: the range check makes the host wait for the GPU: every host-side step is done before it
    if check:
        check_ranges(tables, starts, lens, num_blocks, block_size, q.shape[0])
    launch()
    return out


def _prepare_v1(out, q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, dt):
    """Version 1's launch as a closure: grid (num_tokens, num_qo_heads)."""
    import cupy

    num_tokens, num_qo_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    num_seqs, max_blocks = block_tables.shape
    if num_tokens == 0 or num_seqs == 0:
        return lambda: None
    kernel = _v1_kernel(dt, head_dim)
    args = (out, q, k_cache, v_cache, block_tables, query_start_loc, context_lens, cupy.int32(num_seqs),
            cupy.int32(num_qo_heads), cupy.int32(num_kv_heads), cupy.int32(block_size.bit_length() - 1),
            cupy.int32(max_blocks), cupy.float32(scale))
    return lambda: kernel((num_tokens, num_qo_heads), (V1_THREADS,), args)


# The most scratch (bytes) the Hopper versions may take for an fp8 cache's gathered 16-bit copy; a larger batch
# (sequences x table width) runs version 2's fp8 load path instead
FP8_GATHER_LIMIT = 1 << 30
# Whether an fp8 cache on sm_90 runs versions 4 / 5 over the gathered copy by default (on since stop 25: its
# float64-reference tests, memcheck and racecheck passed on an H100, and the engine's fp8 tests with CUDA graphs
# passed with it on; measurements in kernels_cu/NOTES_fp8.md). False sends every fp8 prefill to version 2.
FP8_HOPPER_DEFAULT = True


def fp8_default_version(dt: int, head_dim: int, table_shape, cache_shape, device_id: int) -> int:
    """The version an fp8 cache runs by default: with :data:`FP8_HOPPER_DEFAULT`, 4 or 5 (the Hopper default of
    the head_dim, over a gathered 16-bit copy of the blocks read) where they run and the copy fits
    :data:`FP8_GATHER_LIMIT`; else 2 (which converts fp8 tiles in its own load path)."""
    _, num_kv_heads, block_size, _ = cache_shape
    scratch = cache_ops.dequant_gather_bytes(*table_shape, num_kv_heads, block_size, head_dim)
    if FP8_HOPPER_DEFAULT and sm90.supports(dt, head_dim, device_id) and scratch <= FP8_GATHER_LIMIT:
        return sm90.DEFAULT_VERSION[head_dim]
    return 2


def _prepare_sm90_fp8(version, out, q, k_cache, v_cache, tables, starts, lens, scale, dt, defines, kv_dtype,
                      k_scale, v_scale):
    """Versions 4 / 5 over an fp8 cache, two launches: the blocks the batch reads, gathered into a 16-bit scratch
    pool (``K = fp8`` exactly, ``V = dt(fp8 * v_scale)``; cache_ops.cu: dequant_gather_fp8), then the kernel over
    that pool with ``k_scale`` folded into the softmax scale.

    NOTE: prefill is compute-bound: the gather moves 1 + 2 bytes per element read once, while the kernel reads each
    K/V tile once per 128-row query tile (measured: kernels_cu/NOTES_fp8.md, "fp8 cache on Hopper")."""
    k16, v16, gathered, gather = cache_ops.prepare_dequant_gather(k_cache, v_cache, tables, starts, lens, kv_dtype,
                                                                  dt, 1.0, v_scale)
    attend = sm90.prepare(version, out, q, k16, v16, gathered, starts, lens, scale * k_scale, dt,
                          _plain_kernel("prefill_plan_kernel"), capacity, defines)

    def launch():
        gather()
        attend()
    return launch


def v2_launch_plan(q_shape, cache_shape, num_seqs: int, max_blocks: int, config: TileConfig, fp8: bool = False) -> dict:
    """Version 2's launch shape from array shapes alone: work-list capacity, grid, block, shared memory."""
    num_tokens, num_qo_heads, head_dim = q_shape
    _, num_kv_heads, block_size, _ = cache_shape
    group = num_qo_heads // num_kv_heads
    cap = capacity(num_tokens, num_seqs, group, config.block_m)
    return {"group": group, "capacity": cap, "grid": cap * num_kv_heads, "threads": config.threads,
            "smem": config.smem_bytes(head_dim, fp8), "max_work": max(1, -(-max_blocks * block_size // config.block_n))}


def _prepare_v2(out, q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, dt, config,
                defines=(), fmt=0, k_scale=1.0, v_scale=1.0):
    """Version 2's launch (plan kernel, then the attention grid) as a closure; scratch allocated now. An fp8
    cache (``fmt`` 1 / 2): k_scale folds into the softmax scale, v_scale is the kernel's last argument."""
    import cupy

    num_tokens, num_qo_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    num_seqs, max_blocks = block_tables.shape
    plan = v2_launch_plan(q.shape, k_cache.shape, num_seqs, max_blocks, config, fmt != 0)
    unit = FP8_UNIT.get(fmt, 1.0)
    if plan["capacity"] == 0 or num_tokens == 0:
        return lambda: None
    kernel, plan_kernel = _v2_kernel(dt, head_dim, config, defines, fmt), _plain_kernel("prefill_plan_kernel")
    work_list = cupy.empty(2 * plan["capacity"], dtype=cupy.int32)
    plan_args = (work_list, query_start_loc, context_lens, cupy.int32(num_seqs), cupy.int32(plan["group"]),
                 cupy.int32(config.block_m), cupy.int32(config.block_n), cupy.int32(plan["max_work"]),
                 cupy.int32(plan["capacity"]))
    args = (out, q, k_cache, v_cache, block_tables, query_start_loc, context_lens, work_list,
            cupy.int32(num_qo_heads), cupy.int32(num_kv_heads), cupy.int32(plan["group"]),
            cupy.int32(block_size.bit_length() - 1), cupy.int32(max_blocks),
            cupy.float32(scale * k_scale * unit * math.log2(math.e)),
            *((cupy.float32(v_scale * unit),) if fmt else ()))

    def launch():
        plan_kernel((1,), (PLAN_THREADS,), plan_args)
        kernel((plan["grid"],), (plan["threads"],), args, shared_mem=plan["smem"])
    return launch


@lru_cache(maxsize=None)
def causal_flops(num_new: int, num_cached: int, num_qo_heads: int, head_dim: int) -> int:
    """FLOPs of causal attention for one sequence: 4 * head_dim * num_qo_heads * (attended (query, key) pairs),
    pairs = n * num_cached + n (n + 1) / 2 (2 for q.k, 2 for p.v per pair and dim; softmax not counted)."""
    pairs = num_new * num_cached + num_new * (num_new + 1) // 2
    return 4 * head_dim * num_qo_heads * pairs



def _prepare_v3(out, q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, dt, defines=()):
    """Version 3's launch (plan kernel, then the wgmma grid) as a closure; scratch allocated now."""
    import cupy

    num_tokens, num_qo_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    num_seqs, max_blocks = block_tables.shape
    group = num_qo_heads // num_kv_heads
    cap = capacity(num_tokens, num_seqs, group, V3_BLOCK_M)
    if cap == 0 or num_tokens == 0:
        return lambda: None
    _, kernel = _v3_kernel(dt, head_dim, cupy.cuda.Device().id, tuple(defines))
    plan_kernel = _plain_kernel("prefill_plan_kernel")
    work_list = cupy.empty(2 * cap, dtype=cupy.int32)
    max_work = max(1, -(-max_blocks * block_size // V3_BLOCK_N))
    plan_args = (work_list, query_start_loc, context_lens, cupy.int32(num_seqs), cupy.int32(group),
                 cupy.int32(V3_BLOCK_M), cupy.int32(V3_BLOCK_N), cupy.int32(max_work), cupy.int32(cap))
    args = (out, q, k_cache, v_cache, block_tables, query_start_loc, context_lens, work_list,
            cupy.int32(num_qo_heads), cupy.int32(num_kv_heads), cupy.int32(group),
            cupy.int32(block_size.bit_length() - 1), cupy.int32(max_blocks), cupy.float32(scale * math.log2(math.e)))
    smem = v3_smem_bytes(head_dim)

    def launch():
        plan_kernel((1,), (PLAN_THREADS,), plan_args)
        kernel((cap * num_kv_heads,), (V3_THREADS,), args, shared_mem=smem)
    return launch
