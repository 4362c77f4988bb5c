"""Launchers of ``kernels_cu/paged_attention.cu``: paged decode attention, kernels 1, 2 and 3 (430 lines: three
versions, the default's dispatcher and the fp8 cache types share the cached launch plans).

Modules come from :mod:`pagedkv.kernels.compile` (one per launch and option set: kernel version, element
type, head_dim, GT, ``-D`` defines). Launch arithmetic that needs no GPU (tile shapes, shared memory, the
split-K plans) lives in :mod:`pagedkv.kernels.decode_plan`.

The launchers take CuPy arrays already shape/dtype-checked by :mod:`pagedkv.kernels.ops`; they check what
only they know (head_dim, block size, contiguity, alignment), run the GPU-side range check (one reduction
and one small device-to-host read, skipped with ``check=False``), pick the launch shape, and launch.

bfloat16: CuPy arrays of ``ml_dtypes.bfloat16`` are used directly when CuPy accepts them; otherwise pass
uint16 views and ``kv_dtype="bfloat16"``; the kernels only see raw 16-bit words either way.

fp8 KV caches (kernels 2, 3 and the default): uint8 pools of raw e4m3/e5m2 bytes with
``kv_dtype="fp8_e4m3"`` (or ``"fp8"``) / ``"fp8_e5m2"`` and per-layer scales ``k_scale`` / ``v_scale``
(stored x = byte value * scale); q and out stay float16/bfloat16.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from . import decode_tc
from .compile import U64_MAX, blocks_per_sm, dt_code, int32_contiguous, load_function, num_sms, opt_in_smem
from .decode_plan import (V2_STAGES, V2_THREADS, V2_TILE_BYTES, choose_num_partitions, group_tile,
                          partition_max_parts, tile_shape,
                          v2_smem_bytes, v3_min_tiles, v3_smem_bytes)

HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 256)  # every multiple of 16 that Llama/Qwen-family models use
VERSIONS = (1, 2, 3, 4)  # 4: tensor cores, opt-in (pagedkv.kernels.decode_tc)
# None: the default, kernel 3's launch with its on-device dispatcher (mode 0: the balanced walk or the
# partition plan, picked per launch from context_lens; kernels_cu/NOTES.md)
DEFAULT_VERSION = None
MODES = {0: "auto", 2: "partition", 3: "walk"}  # kernel 3's `mode` argument
FP8_KV_DTYPES = {"fp8": 3, "fp8_e4m3": 3, "fp8_e5m2": 4}  # kv_dtype -> cache type code (uint8 caches)
GROUP_TILES = (1, 2, 4, 8)  # query heads per v2/v3 thread block (template parameter GT)
REDUCE_THREADS = 256  # PAGEDKV_REDUCE_THREADS in paged_attention.cu


# ---- paged attention ------------------------------------------------------------------------------

def _ct_arg(dt: int, ct: int | None) -> str:
    """The cache-type template argument (absent when the cache has q's type: the C++ default)."""
    return "" if ct is None or ct == dt else f", {ct}"


def attention_names(dt: int, head_dim: int, ct: int | None = None) -> tuple[str, ...]:
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


def attention_kernel(kind: str, dt: int, head_dim: int, gt: int = 0, tile_bytes=V2_TILE_BYTES,
                      stages=V2_STAGES, extra_defines: tuple = (), ct: int | None = None):
    """One kernel of paged_attention.cu. A module holds one launch's kernels (kernel 2 with its merge, or
    kernel 3, for one GT), so a process compiles only the instantiations it launches.

    NOTE: CuPy recompiles a module with name expressions in every process (its disk cache is skipped
    for them); small modules keep that cost to the kernels actually used.
    """
    if kind == "check":  # extern "C", no templates instantiated: this module is disk-cached
        return load_function("paged_attention.cu", "check_block_tables_kernel")
    c = _ct_arg(dt, ct)
    names = tuple(_KERNEL_NAMES[k].format(dt=dt, hd=head_dim, gt=gt, c=c) for k in _LAUNCH_GROUP[kind])
    defines = () if kind == "v1" else (("PAGEDKV_V2_TILE_BYTES", tile_bytes), ("PAGEDKV_V2_STAGES", stages),
                                       *extra_defines)
    return load_function("paged_attention.cu", _KERNEL_NAMES[kind].format(dt=dt, hd=head_dim, gt=gt, c=c), names,
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
    attention_kernel("check", 0, 0)((grid,), (256,), (
        block_tables, context_lens, cupy.int32(batch), cupy.int32(max_blocks), cupy.int32(num_blocks),
        cupy.int32(block_size), bad))
    bad_len, bad_entry = (int(x) for x in bad.get())
    if bad_len != U64_MAX:
        raise ValueError(f"context_lens[{bad_len}]={int(context_lens[bad_len])} outside [1, {capacity}] "
                         f"(max_blocks * block_size)")
    if bad_entry != U64_MAX:
        i, j = divmod(bad_entry, max_blocks)
        raise ValueError(f"block_tables[{i}, {j}]={int(block_tables[i, j])} outside [0, {num_blocks})")


def check_scale(name: str, value) -> float:
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
        dt = dt_code(q_dtype, "bfloat16" if np.dtype(q_dtype) == np.uint16 else None)
        if dt == 0:
            raise ValueError("fp8 KV caches need float16 or bfloat16 queries, got float32")
        return dt, FP8_KV_DTYPES[name]
    if cache_dtype == np.uint8:
        raise ValueError(f"a uint8 cache holds fp8 bytes: pass kv_dtype= one of {sorted(FP8_KV_DTYPES)} "
                         f"(got kv_dtype={kv_dtype!r})")
    if name not in (None, "bfloat16", "bf16"):
        raise ValueError(f"kv_dtype must be None, 'bfloat16' or one of {sorted(FP8_KV_DTYPES)}, got {kv_dtype!r}")
    dt = dt_code(q_dtype, kv_dtype)
    return dt, dt


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, *, scale=None, version=None, out=None,
                    check=True, kv_dtype=None, k_scale=1.0, v_scale=1.0, num_partitions=None, num_ctas=None,
                    min_tiles=None, mode=None, group_tile=None, tile_bytes=V2_TILE_BYTES, stages=V2_STAGES,
                    extra_defines: tuple = (), split=None, fp8_path=None):
    """Launch paged decode attention (see :func:`pagedkv.kernels.ops.paged_attention` for shapes).

    ``version``: 1, 2, 3, 4 or None (default: kernel 3's launch with its dispatcher, which picks the balanced
    walk or the partition plan on the device from ``context_lens``, so a captured graph chooses again at
    every replay). Version 4 (opt-in): tensor-core decode (:mod:`pagedkv.kernels.decode_tc`; head_dim 64 / 128,
    float16 / bfloat16 q, 1-8 query heads per KV head; :func:`choose_version` is the engine's rule for when it
    pays). Kernels 2 and 4: ``num_partitions`` forces the split-K count (default: :func:`choose_num_partitions`);
    version 4: ``split`` cuts each sequence into pieces of the table's capacity (``"capacity"``, kernel 2's cut,
    the default) or of its own length (``"length"``, worked out on the device; what :func:`choose_version`
    models and the engine's tensor-core variant launches); ``fp8_path`` how an fp8 cache reaches its MMAs
    (:data:`pagedkv.kernels.decode_tc.FP8_PATHS`; default :data:`pagedkv.kernels.decode_tc.FP8_PATH`).
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
    k_scale, v_scale = check_scale("k_scale", k_scale), check_scale("v_scale", v_scale)
    if version is not None and version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS} or None (the dispatcher), got {version!r}")
    if version == 1 and ct != dt:
        raise ValueError(f"kernel 1 reads float16/bfloat16/float32 caches only, not kv_dtype={kv_dtype!r}: use "
                         f"version 2, 3 or None")
    if mode is not None and (mode not in MODES or version in (1, 2, 4)):
        raise ValueError(f"mode must be one of {sorted(MODES)} with version 3 or None, got mode={mode!r} "
                         f"version={version!r}")
    if group_tile is not None and (group_tile not in GROUP_TILES or version in (1, 2, 4)):
        raise ValueError(f"group_tile must be one of {GROUP_TILES} with version 3 or None, got {group_tile!r}")
    if split is not None and (split not in decode_tc.SPLITS or version != 4):
        raise ValueError(f"split must be one of {decode_tc.SPLITS} with version 4, got split={split!r} "
                         f"version={version!r}")
    if fp8_path is not None and version != 4:
        raise ValueError(f"fp8_path is an option of version 4, got fp8_path={fp8_path!r} version={version!r}")
    if version == 4:
        decode_tc.check_args(dt, ct, head_dim, num_qo_heads, num_kv_heads)
        fp8_path = decode_tc.resolve_fp8_path(fp8_path, ct)
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
    block_tables, context_lens = int32_contiguous(block_tables), int32_contiguous(context_lens)
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
    elif version == 4:
        launch = decode_tc.prepare(out, q, k_cache, v_cache, block_tables, context_lens, scale, dt, ct, scales,
                                   num_partitions, split or "capacity", fp8_path)
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


def choose_version(q_shape, cache_shape, max_blocks: int, dt: int, ct: int | None, context_lens) -> int | None:
    """The engine's decode kernel for one step whose host ``context_lens`` it knows: 4 (tensor cores) where
    version 4 serves the shape on this GPU (:func:`pagedkv.kernels.decode_tc.runs_on`) and
    :func:`pagedkv.kernels.decode_tc.tc_decode_pays` says its grid is balanced enough, else None
    (the default: kernel 3's dispatcher, which balances any batch on the device). Host-side, so a model runner
    keeps a CUDA graph per answer (:mod:`pagedkv.model.attention`'s decode variants); compiles version 4 at its
    first call for a shape."""
    import cupy

    _, num_qo_heads, head_dim = q_shape
    _, num_kv_heads, _, _ = cache_shape
    ct = dt if ct is None else ct
    if not decode_tc.runs_on(dt, ct, head_dim, num_qo_heads, num_kv_heads, cupy.cuda.Device().id):
        return None
    path = decode_tc.resolve_fp8_path(None, ct)
    plan = decode_tc.launch_plan(q_shape, cache_shape, max_blocks, dt, ct, None, path)
    pays = decode_tc.tc_decode_pays(context_lens, num_qo_heads, num_kv_heads, plan["parts"], plan["resident_ctas"])
    return 4 if pays else None


def _prepare_v1(out, q, k_cache, v_cache, block_tables, context_lens, scale, dt):
    """Kernel 1's launch as a closure (scratch logits allocated now)."""
    import cupy

    _, num_kv_heads, block_size, head_dim = k_cache.shape
    batch, num_qo_heads, _ = q.shape
    max_blocks = block_tables.shape[1]
    logits = cupy.empty((batch, num_qo_heads, max_blocks * block_size), dtype=cupy.float32)
    kernel = attention_kernel("v1", dt, head_dim)
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
    kernel = attention_kernel("v2", dt, head_dim, gt, tile_bytes, stages, extra_defines, ct)
    smem = v2_smem_bytes(ct, head_dim, gt, tile_bytes, stages)
    opt_in_smem(kernel, smem)
    resident = blocks_per_sm(kernel, V2_THREADS, smem, device_id) * num_sms(device_id)
    if num_partitions is None:
        parts, part_tokens = choose_num_partitions(batch, num_kv_heads * q_tiles, max_context, tile_tokens,
                                                   resident)
    else:
        part_tokens = -(-(-(-max_context // num_partitions)) // tile_tokens) * tile_tokens
        parts = -(-max_context // part_tokens)
    return {"kernel": kernel, "group": group, "gt": gt, "q_tiles": q_tiles, "parts": parts,
            "part_tokens": part_tokens, "smem": smem, "resident_ctas": resident, "num_regs": kernel.num_regs,
            "reduce": None if parts == 1 else attention_kernel("reduce", dt, head_dim, gt, tile_bytes, stages,
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
    kernel = attention_kernel("v3", dt, head_dim, gt, tile_bytes, stages, extra_defines, ct)
    smem = v3_smem_bytes(ct, head_dim, gt, tile_bytes, stages)
    opt_in_smem(kernel, smem, prefer_shared=True)
    per_sm = blocks_per_sm(kernel, V2_THREADS, smem, device_id)
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
            "counters": _split_counters(4 + max(ctas, items0), device_id,
                                        (q_shape, cache_shape, dt, ct, gt, num_ctas, min_tiles, tile_bytes, stages,
                                         extra_defines, max_blocks))}


@lru_cache(maxsize=None)
def _split_counters(size: int, device_id: int, owner: tuple = ()):
    """Kernel 3's counters: ``[size]`` int32, zeroed once here; every launch leaves them zero (but entry 2,
    the last launch's choice: ``mode | parts << 8``, which :func:`last_dispatch` reads). One array per plan
    (``owner``: the plan's shapes and options), so a plan's entry 2 is its own launch's.

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
