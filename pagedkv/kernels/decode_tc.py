"""Launcher of ``kernels_cu/paged_attention_tc.cu``: paged decode attention version 4 on tensor cores (opt-in,
``pagedkv.kernels.decode.paged_attention(..., version=4)``).

One thread block per (KV partition, KV head, sequence); the GQA group's query heads are the rows of an
``mma.sync.m16n8k16`` A operand (padded to 16), K/V tiles of :data:`BLOCK_N` keys come through a cp.async ring,
split sequences are merged in the same launch by their last partition. The partition count depends on shapes
only (``max_blocks * block_size``, the device's resident blocks); each sequence is cut into that many pieces of
its own length on the device (:data:`SPLITS` ``"length"``) or of the table's capacity (``"capacity"``, the
default), so a captured CUDA graph replays with new ``context_lens``. Caches: q's type (float16 /
bfloat16) or fp8 (uint8 bytes, ``decode.FP8_KV_DTYPES``).

Launch arithmetic that needs no GPU (:func:`smem_bytes`, :func:`partition_plan`, :func:`check_args`) and the
engine's per-step rule for when version 4 pays (:func:`tc_decode_pays`, used by ``decode.choose_version``) are
pure Python and tested on the CPU.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .compile import blocks_per_sm, load_function, num_sms, opt_in_smem
from .decode_plan import choose_num_partitions

HEAD_DIMS = (64, 128)
MAX_GROUP = 8  # PAGEDKV_TC_MAX_GROUP: query heads per KV head (the MMA's 16 rows, 8 used)
THREADS = 128  # PAGEDKV_TC_THREADS
WARPS = 4
WARP_N = 16  # keys per warp per tile
BLOCK_N = WARPS * WARP_N  # keys per tile; partitions are whole tiles
STAGES_16, STAGES_8 = 3, 4  # PAGEDKV_TC_STAGES16 / PAGEDKV_TC_STAGES8: cp.async stages (16-bit / fp8 cache)
FP8_CTS = (3, 4)  # cache type codes of e4m3 / e5m2 (decode.FP8_KV_DTYPES)
UNIT = {3: 256.0, 4: 1.0}  # e4m3's converted values are value * 2^-8 (kernels_cu/fp8_convert.cuh), both paths
# how a sequence is cut into the plan's partitions: pieces of ceil(len / parts) tokens rounded up to whole tiles
# (worked out on the device from context_lens), or pieces of the plan's partition_tokens (the table's capacity
# / parts: short sequences of a wide table live in few partitions)
SPLITS = ("length", "capacity")
# how an fp8 cache reaches the MMAs (the kernel's FRAG): "tile" each warp converts its rows into a 16-bit tile read
# by ldmatrix (timed, the default); "registers" each lane builds its fragments from the raw bytes (permuted head
# dimension for Q and K, permuted output dimensions for V), no converted tile, 3 blocks an SM at head_dim 128
FP8_PATHS = ("tile", "registers")
FP8_PATH = "tile"  # the path an fp8 cache takes when none is named (decode.paged_attention, the engine's choice)
FP8_ROW_PAD = {"tile": 0, "registers": 16}  # bytes after each raw fp8 row of a stage (Tc::ROW8)


def kernel_name(dt: int, head_dim: int, ct: int, fp8_path: str = "tile") -> str:
    if fp8_path == "registers":
        return f"paged_attention_tc_kernel<{dt}, {head_dim}, {ct}, 1>"
    return f"paged_attention_tc_kernel<{dt}, {head_dim}, {ct}>"


def kernel_names(dt: int, head_dim: int) -> tuple[str, ...]:
    """Every instantiation for one q type and head_dim: a cache of q's type, e4m3, e5m2 (both fp8 paths)."""
    return (kernel_name(dt, head_dim, dt), *(kernel_name(dt, head_dim, ct, path)
                                             for ct in FP8_CTS for path in FP8_PATHS))


def resolve_fp8_path(fp8_path: str | None, ct: int) -> str:
    """The path a launch takes: ``fp8_path`` if named, else :data:`FP8_PATH` for an fp8 cache and "tile" (the
    only path) for a 16-bit one; checked (:func:`check_fp8_path`)."""
    path = fp8_path if fp8_path is not None else FP8_PATH if ct in FP8_CTS else "tile"
    check_fp8_path(path, ct)
    return path


def check_fp8_path(fp8_path: str, ct: int) -> None:
    """``fp8_path`` is one of :data:`FP8_PATHS`; "registers" needs an fp8 cache (``ValueError`` otherwise)."""
    if fp8_path not in FP8_PATHS:
        raise ValueError(f"fp8_path must be one of {FP8_PATHS}, got {fp8_path!r}")
    if fp8_path == "registers" and ct not in FP8_CTS:
        raise ValueError("fp8_path='registers' builds fragments from fp8 bytes: it needs an fp8 cache, got "
                         f"cache type code {ct}")


def check_args(dt: int, ct: int, head_dim: int, num_qo_heads: int, num_kv_heads: int) -> None:
    """What version 4 supports; ``ValueError`` naming the offending value otherwise."""
    if dt not in (1, 2):
        raise ValueError("version 4 needs float16 or bfloat16 queries (tensor-core MMA), got float32")
    if ct != dt and ct not in FP8_CTS:
        raise ValueError(f"version 4 reads a cache of q's type or fp8, got cache type code {ct} for q code {dt}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"version 4 supports head_dim {HEAD_DIMS}, got head_dim={head_dim}")
    group = num_qo_heads // num_kv_heads
    if not 1 <= group <= MAX_GROUP:
        raise ValueError(f"version 4 serves 1..{MAX_GROUP} query heads per KV head, got "
                         f"num_qo_heads / num_kv_heads = {num_qo_heads} / {num_kv_heads} = {group}")


@lru_cache(maxsize=None)
def runs_on(dt: int, ct: int, head_dim: int, num_qo_heads: int, num_kv_heads: int, device_id: int) -> bool:
    """Whether version 4 serves this shape (:func:`check_args`) on this GPU (compute capability 8.0 or later:
    mma.m16n8k16 on bfloat16, cp.async); cached, so a per-step caller pays a dictionary lookup."""
    import cupy

    try:
        check_args(dt, ct, head_dim, num_qo_heads, num_kv_heads)
    except ValueError:
        return False
    return int(cupy.cuda.Device(device_id).compute_capability) >= 80


def smem_bytes(ct: int, head_dim: int, fp8_path: str = "tile") -> int:
    """Dynamic shared memory of one block (``Tc<DT, HEAD_DIM, CT, FRAG>::SMEM_BYTES``): the pipeline (reused by
    the end-of-block merge) and the ring of 64-bit row offsets."""
    fp8 = ct in FP8_CTS
    stages = STAGES_8 if fp8 else STAGES_16
    row = head_dim + 8
    stage = BLOCK_N * (head_dim + FP8_ROW_PAD[fp8_path]) if fp8 else BLOCK_N * row * 2
    pipe = 2 * stages * stage + (WARPS * 2 * WARP_N * row * 2 if fp8 and fp8_path == "tile" else 0)
    end = WARPS * MAX_GROUP * (head_dim + 2) * 4 + (MAX_GROUP * 2 + THREADS) * 4 + THREADS * 16
    return max(pipe, end) + stages * BLOCK_N * 8


def partition_plan(batch: int, num_kv_heads: int, capacity: int, resident_ctas: int,
                   num_partitions: int | None = None) -> tuple[int, int]:
    """``(num_partitions, partition_tokens)``: kernel 2's wave-filling split-K rule
    (:func:`pagedkv.kernels.decode_plan.choose_num_partitions`) over ``batch * num_kv_heads`` blocks per
    partition and tiles of :data:`BLOCK_N` keys; ``capacity`` = max_blocks * block_size (no device read).
    ``num_partitions`` forces the count (tests: merges on small inputs)."""
    if num_partitions is None:
        return choose_num_partitions(batch, num_kv_heads, capacity, BLOCK_N, resident_ctas)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    tokens = -(-capacity // num_partitions)  # per partition, then rounded up to whole tiles of BLOCK_N
    part_tokens = -(-tokens // BLOCK_N) * BLOCK_N
    return -(-capacity // part_tokens), part_tokens


# ---- the engine's choice per step: version 4 or the default dispatcher (pure arithmetic) --------------
TC_BALANCE = 1.25  # version 4 when its longest piece is at most this many times the mean work per resident block
TC_SMALL_PIECE = 1024  # ... or at most this many tokens (the launch is short whatever its balance)


def tc_longest_piece(max_len: int, parts: int) -> int:
    """Version 4's longest piece (tokens) under its length split: ``ceil(max_len / parts)`` in whole tiles."""
    return -(-max_len // (parts * BLOCK_N)) * BLOCK_N


def tc_decode_pays(context_lens, num_qo_heads: int, num_kv_heads: int, parts: int, resident_ctas: int) -> bool:
    """Whether version 4 (tensor cores, one thread block per (partition, KV head, sequence)) should run a decode
    step instead of the default dispatcher (kernel 3's balanced walk / partition plan), from the step's host
    ``context_lens``.

    Version 4 reads a tile at kernel 2's cost and beats kernel 3 on uniform batches and on small or short ragged
    ones (kernels_cu/NOTES_decode_tc.md), but its grid is planned from shapes only: its time is at least the
    longest piece's, where kernel 3 balances the tokens over the resident blocks. So version 4 runs when its
    longest piece (:func:`tc_longest_piece` under its ``parts`` partitions) is within :data:`TC_BALANCE` of the
    mean work per resident block (``num_kv_heads * sum(lens) / resident_ctas`` tokens), or short
    (:data:`TC_SMALL_PIECE`); never for one query head per KV head (its MMA rows would be 15/16 padding:
    measured slower). ``parts`` and ``resident_ctas``: version 4's launch plan
    (:func:`launch_plan`).
    """
    lens = np.asarray(context_lens)
    if num_qo_heads // num_kv_heads < 2 or lens.size == 0:
        return False
    max_len = int(lens.max())
    if max_len <= 0:
        return False
    piece = tc_longest_piece(max_len, parts)
    mean_work = num_kv_heads * float(lens.clip(min=0).sum()) / resident_ctas
    return piece <= TC_SMALL_PIECE or piece <= TC_BALANCE * mean_work


def attention_kernel(dt: int, head_dim: int, ct: int, fp8_path: str = "tile"):
    """The version-4 kernel of one (q type, head_dim, cache type, fp8 path); one module per instantiation."""
    name = kernel_name(dt, head_dim, ct, fp8_path)
    return load_function("paged_attention_tc.cu", name, (name,))


def launch_plan(q_shape, cache_shape, max_blocks: int, dt: int, ct: int, num_partitions=None,
                fp8_path: str = "tile") -> dict:
    """How version 4 will be launched (compiles if needed): partitions, shared memory, resident blocks."""
    import cupy

    return dict(_plan(tuple(q_shape), tuple(cache_shape), int(max_blocks), dt, ct, num_partitions,
                      cupy.cuda.Device().id, fp8_path))


@lru_cache(maxsize=4096)
def _plan(q_shape, cache_shape, max_blocks, dt, ct, num_partitions, device_id, fp8_path="tile"):
    batch, num_qo_heads, _ = q_shape
    _, num_kv_heads, block_size, head_dim = cache_shape
    kernel = attention_kernel(dt, head_dim, ct, fp8_path)
    smem = smem_bytes(ct, head_dim, fp8_path)
    opt_in_smem(kernel, smem)
    per_sm = blocks_per_sm(kernel, THREADS, smem, device_id)
    parts, part_tokens = partition_plan(batch, num_kv_heads, max_blocks * block_size, per_sm * num_sms(device_id),
                                        num_partitions)
    return {"kernel": kernel, "group": num_qo_heads // num_kv_heads, "parts": parts, "part_tokens": part_tokens,
            "smem": smem, "blocks_per_sm": per_sm, "resident_ctas": per_sm * num_sms(device_id),
            "num_regs": kernel.num_regs}


@lru_cache(maxsize=None)
def merge_counters(size: int, device_id: int):
    """Merge counters ``[size]`` int32, zeroed once; every launch leaves them zero.

    NOTE: allocated outside any memory pool (a CUDA graph's included), so they live as long as the process;
    two launches of the same counter size on two streams at once would share them (not supported, as for
    kernel 3).
    """
    import cupy

    memory = cupy.cuda.Memory(4 * size)
    cupy.cuda.runtime.memset(memory.ptr, 0, 4 * size)
    return cupy.ndarray((size,), dtype=cupy.int32, memptr=cupy.cuda.MemoryPointer(memory, 0))


def prepare(out, q, k_cache, v_cache, block_tables, context_lens, scale: float, dt: int, ct: int,
            scales=(1.0, 1.0), num_partitions=None, split: str = "capacity", fp8_path: str = "tile"):
    """Version 4's launch as a closure (scratch partials allocated now). Arguments as
    :func:`pagedkv.kernels.decode.paged_attention` leaves them: checked (:func:`check_args` included),
    contiguous, int32 tables.

    Args:
        out, q: [batch, num_qo_heads, head_dim] float16 / bfloat16 (raw 16-bit words).
        k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim], q's type or uint8 fp8 bytes.
        block_tables: [batch, max_blocks] int32; context_lens: [batch] int32.
        scale: softmax scale; dt / ct: q / cache type codes; scales: (k_scale, v_scale).
        num_partitions: forces the plan's partition count; split: one of :data:`SPLITS`.
        fp8_path: one of :data:`FP8_PATHS` ("registers": fp8 caches only).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_fp8_path(fp8_path, ct)
    import cupy

    _, num_kv_heads, block_size, head_dim = k_cache.shape
    batch, num_qo_heads, _ = q.shape
    max_blocks = block_tables.shape[1]
    plan = launch_plan(q.shape, k_cache.shape, max_blocks, dt, ct, num_partitions, fp8_path)
    parts, group = plan["parts"], plan["group"]
    if parts == 1:
        part_out = part_ml = cupy.empty(1, dtype=cupy.float32)
    else:
        slots = batch * num_kv_heads * parts
        # NOTE: rows of MAX_GROUP heads per slot (kernels_cu/split_merge.cuh's layout), group of them used
        part_out = cupy.empty((slots, MAX_GROUP, head_dim), dtype=cupy.float32)
        part_ml = cupy.empty((slots, MAX_GROUP, 2), dtype=cupy.float32)
    unit = UNIT.get(ct, 1.0)
    counters = merge_counters(max(1, batch * num_kv_heads), cupy.cuda.Device().id)
    args = (out, part_out, part_ml, counters, q, k_cache, v_cache, block_tables, context_lens,
            cupy.int32(num_qo_heads), cupy.int32(num_kv_heads), cupy.int32(group),
            cupy.int32(block_size.bit_length() - 1), cupy.int32(max_blocks),
            cupy.int32(plan["part_tokens"] if split == "capacity" else 0),  # 0: the length split, on the device
            cupy.float32(scale * math.log2(math.e) * scales[0] * unit), cupy.float32(scales[1] * unit))
    grid = (parts, num_kv_heads, batch)
    return lambda: plan["kernel"](grid, (THREADS,), args, shared_mem=plan["smem"])
