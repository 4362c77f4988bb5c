"""Launchers of ``kernels_cu/cascade_attention.cu``: decode attention as a shared-prefix pass, a per-row suffix
pass and a log-sum-exp merge (issue 17).

Three kernels (the file header draws them): ``cascade_prefix_kernel`` (tensor cores, float16 / bfloat16, the
queries of every row of a group against the group's shared blocks, split along the prefix),
``cascade_rows_kernel`` (CUDA cores, every dtype: a key range of each row through its own table; the suffix
pass, and the prefix pass of float32 and of head dims the tensor-core kernel lacks) and ``cascade_merge_kernel``
(``merge_attn_states``). Every launch shape depends on array shapes only, so :func:`cascade_attention` can be
captured in a CUDA graph and replayed with new groups, prefix lengths and context lengths.

The launchers take arrays already checked by :mod:`pagedkv.cascade`; they check what only they know (head_dim,
block size, contiguity, alignment) and launch. Modules load through :mod:`pagedkv.kernels.compile`.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .compile import blocks_per_sm, dt_code, int32_contiguous, load_function, num_sms

FILENAME = "cascade_attention.cu"
HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 256)  # the rows and merge kernels
# the tensor-core prefix kernel: the head dims tested on the GPU (others: the rows kernel does the prefix pass)
PREFIX_HEAD_DIMS = (64, 128)
PREFIX_THREADS, PREFIX_BLOCK_N, ROWS_THREADS, MERGE_THREADS = 128, 64, 128, 128
MAX_SPLITS = 16
_NULL = np.uint64(0)  # a null pointer argument (CuPy passes a 64-bit integer as is)


def prefix_shape(num_rows: int, group: int, head_dim: int) -> tuple[int, int]:
    """(m_tiles, stages) of the prefix kernel: 32 packed rows per warp when the batch has at least two full
    128-row tiles (each K/V fragment then feeds two MMAs), else 16; 3 stages where they fit two blocks per SM.

    NOTE: shape-only (the batch's row count), so a CUDA graph of a bucket keeps one instantiation."""
    m_tiles = 2 if num_rows * group >= 256 else 1
    stages = 3 if head_dim <= 64 else 2
    return m_tiles, stages


def prefix_smem_bytes(head_dim: int, m_tiles: int, stages: int) -> int:
    """Mirror of ``Prefix::SMEM_BYTES``."""
    rows = 4 * 16 * m_tiles
    return (rows + 2 * stages * PREFIX_BLOCK_N) * (head_dim + 8) * 2 + stages * PREFIX_BLOCK_N * 8


def prefix_name(dt: int, head_dim: int, m_tiles: int, stages: int) -> str:
    return f"cascade_prefix_kernel<{dt}, {head_dim}, {m_tiles}, {stages}>"


def rows_gt(group: int) -> int:
    """Query heads per thread block of the rows kernel (registers: at most 4 of a KV head's group)."""
    return 1 if group == 1 else 2 if group == 2 else 4


ROWS_UNROLL = 4  # key rows per slot in flight (template UNROLL)


def rows_name(dt: int, head_dim: int, gt: int, unroll: int = ROWS_UNROLL) -> str:
    return f"cascade_rows_kernel<{dt}, {head_dim}, {gt}, {unroll}>"


def merge_name(dt: int, head_dim: int) -> str:
    return f"cascade_merge_kernel<{dt}, {head_dim}>"


def launched_names(dt: int, head_dim: int) -> tuple[str, ...]:
    """Every instantiation the launchers may use for (dt, head_dim) (the compile test's list)."""
    names = [rows_name(dt, head_dim, gt) for gt in (1, 2, 4)] + [merge_name(dt, head_dim)]
    if dt != 0 and head_dim in PREFIX_HEAD_DIMS:
        names += [prefix_name(dt, head_dim, m, 3 if head_dim <= 64 else 2) for m in (1, 2)]
    return tuple(names)


def _kernel(name: str):
    return load_function(FILENAME, name, (name,))


@lru_cache(maxsize=None)
def _prefix_kernel(dt: int, head_dim: int, m_tiles: int, stages: int):
    kernel = _kernel(prefix_name(dt, head_dim, m_tiles, stages))
    smem = prefix_smem_bytes(head_dim, m_tiles, stages)
    if smem > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < smem:
        kernel.max_dynamic_shared_size_bytes = smem
    return kernel


def tile_capacity(num_rows: int, num_groups: int, group: int, m_tiles: int) -> int:
    """Query tiles the prefix kernel launches per (KV head, split): an upper bound over every grouping of
    ``num_rows`` rows into ``num_groups`` groups (each group adds at most one partial tile)."""
    block_m = 64 * m_tiles
    return -(-num_rows * group // block_m) + num_groups


def choose_num_splits(num_rows: int, group: int, num_kv_heads: int, head_dim: int, device_id: int, dt: int = 1,
                      m_tiles: int | None = None) -> int:
    """Prefix splits: as many as keep one group of every row within one wave of resident thread blocks
    (shape-only). NOTE: call 1 on the H100: 9 splits = 288 blocks for 264 resident cost a second wave."""
    m_auto, stages = prefix_shape(num_rows, group, head_dim)
    m_tiles = m_tiles or m_auto
    tiles = max(1, -(-num_rows * group // (64 * m_tiles))) * num_kv_heads
    resident = prefix_blocks_per_sm(dt, head_dim, m_tiles, stages, device_id) * num_sms(device_id)
    return max(1, min(MAX_SPLITS, resident // tiles))


@lru_cache(maxsize=None)
def prefix_blocks_per_sm(dt: int, head_dim: int, m_tiles: int, stages: int, device_id: int) -> int:
    """Resident prefix-kernel blocks per SM (:func:`pagedkv.kernels.compile.blocks_per_sm`)."""
    return blocks_per_sm(_prefix_kernel(dt, head_dim, m_tiles, stages), PREFIX_THREADS,
                         prefix_smem_bytes(head_dim, m_tiles, stages), device_id)


def uses_tensor_cores(dt: int, head_dim: int) -> bool:
    return dt != 0 and head_dim in PREFIX_HEAD_DIMS


def _check_launch(q, k_cache, v_cache):
    _, _, block_size, head_dim = k_cache.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    for name, c in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not c.flags.c_contiguous or c.data.ptr % 16:
            raise ValueError(f"{name} must be C-contiguous and 16-byte aligned")


def prefix_partials(o_part, lse_part, q, k_cache, v_cache, block_tables, group_starts, group_rows, prefix_lens,
                    scale: float, dt: int, m_tiles: int | None = None) -> None:
    """Parts ``0 .. S-1`` (S = ``o_part.shape[0]``) of the rows of groups with a prefix: the tensor-core prefix
    pass split S ways along the prefix. ``o_part`` [>= S, rows, heads, dim] float32, ``lse_part`` [>= S, rows,
    heads] float32 (only the first S parts are written)."""
    import cupy

    num_rows, num_qo_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    num_groups = prefix_lens.shape[0]
    if num_rows == 0 or num_groups == 0:
        return
    group = num_qo_heads // num_kv_heads
    m_auto, stages = prefix_shape(num_rows, group, head_dim)
    m_tiles = m_tiles or m_auto
    kernel = _prefix_kernel(dt, head_dim, m_tiles, stages)
    splits = o_part.shape[0]
    grid = (tile_capacity(num_rows, num_groups, group, m_tiles), num_kv_heads, splits)
    kernel(grid, (PREFIX_THREADS,), (
        o_part, lse_part, q, k_cache, v_cache, block_tables, group_starts, group_rows, prefix_lens,
        cupy.int32(num_groups), cupy.int32(num_rows), cupy.int32(num_qo_heads), cupy.int32(num_kv_heads),
        cupy.int32(group), cupy.int32(block_size.bit_length() - 1), cupy.int32(block_tables.shape[1]),
        cupy.float32(scale * math.log2(math.e))), shared_mem=prefix_smem_bytes(head_dim, m_tiles, stages))


def rows_partial(o_part, lse_part, q, k_cache, v_cache, block_tables, begin, end, scale: float, dt: int, *,
                 out=None, prefix_o=None, prefix_lse=None) -> None:
    """Keys ``[begin[row], end[row])`` of every row (``begin`` None: from 0).

    Without ``out``: one part, ``o_part`` [rows, heads, dim] float32 and ``lse_part`` [rows, heads] float32
    (C-contiguous views). With ``out`` [rows, heads, dim] (dtype ``dt``): the fused merge, ``out`` = this pass
    merged with the prefix parts ``prefix_o`` [P, rows, heads, dim] / ``prefix_lse`` [P, rows, heads] of the rows
    with ``begin[row] > 0``."""
    import cupy

    num_rows, num_qo_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    if num_rows == 0:
        return
    group = num_qo_heads // num_kv_heads
    gt = rows_gt(group)
    fused = out is not None
    parts = prefix_o.shape[0] if fused else 0
    nul = lambda a: _NULL if a is None else a  # noqa: E731
    _kernel(rows_name(dt, head_dim, gt))((num_rows, num_kv_heads, -(-group // gt)), (ROWS_THREADS,), (
        nul(o_part), nul(lse_part), nul(out), nul(prefix_o), nul(prefix_lse), cupy.int32(parts), q, k_cache,
        v_cache, block_tables, nul(begin), end, cupy.int32(num_rows), cupy.int32(num_qo_heads),
        cupy.int32(num_kv_heads), cupy.int32(block_size.bit_length() - 1), cupy.int32(block_tables.shape[1]),
        cupy.float32(scale * math.log2(math.e))))


def merge_partials(out, lse_out, o_part, lse_part, suffix_starts, dt: int) -> None:
    """``out`` [rows, heads, dim] (dtype ``dt``) = merge of the parts (see ``cascade_merge_kernel``)."""
    import cupy

    num_parts, num_rows, num_qo_heads, head_dim = o_part.shape
    pairs = num_rows * num_qo_heads
    if pairs == 0:
        return
    _kernel(merge_name(dt, head_dim))((-(-pairs // (MERGE_THREADS // 32)),), (MERGE_THREADS,), (
        out, _NULL if lse_out is None else lse_out, o_part, lse_part, _NULL if suffix_starts is None else suffix_starts,
        cupy.int32(num_parts), cupy.int32(num_rows),
        cupy.int32(num_qo_heads)))


def cascade_attention(q, k_cache, v_cache, block_tables, context_lens, group_starts, group_rows, prefix_lens,
                      suffix_starts, *, scale: float, out=None, num_splits: int | None = None, kv_dtype=None,
                      m_tiles: int | None = None):
    """Decode attention in three launches: prefix partials of grouped rows, each row's suffix
    ``[suffix_starts[row], context_lens[row])``, the merge (see :func:`pagedkv.cascade.cascade_attention`).

    ``num_splits``: prefix splits (default :func:`choose_num_splits`; 1 where the rows kernel does the prefix);
    ``m_tiles``: 16-row MMA tiles per warp of the prefix kernel (default :func:`prefix_shape`; benchmarks).
    Scratch ([splits + 1, rows, heads, dim] float32) is allocated per call (a graph's private pool in a capture).
    """
    import cupy

    _check_launch(q, k_cache, v_cache)
    num_rows, num_qo_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    dt = dt_code(q.dtype, kv_dtype)
    tables, lens = int32_contiguous(block_tables), int32_contiguous(context_lens)
    starts, rows, plens, sufs = (int32_contiguous(a) for a in (group_starts, group_rows, prefix_lens, suffix_starts))
    if out is None:
        out = cupy.empty(q.shape, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous {q.shape} {q.dtype}, got {out.shape} {out.dtype}")
    tensor_cores = uses_tensor_cores(dt, head_dim)
    if not tensor_cores:
        splits = 1
    elif num_splits is None:
        splits = choose_num_splits(num_rows, num_qo_heads // num_kv_heads, num_kv_heads, head_dim,
                                   cupy.cuda.Device().id, dt, m_tiles)
    else:
        splits = int(num_splits)
        if not 1 <= splits <= MAX_SPLITS:
            raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    o_part = cupy.empty((splits + 1, num_rows, num_qo_heads, head_dim), dtype=cupy.float32)
    lse_part = cupy.empty((splits + 1, num_rows, num_qo_heads), dtype=cupy.float32)
    if tensor_cores:
        prefix_partials(o_part[:splits], lse_part[:splits], q, k_cache, v_cache, tables, starts, rows, plens, scale,
                        dt, m_tiles)
    else:  # NOTE: each row reads the prefix through its own table (the same ids): no saving, the same result
        rows_partial(o_part[0], lse_part[0], q, k_cache, v_cache, tables, None, sufs, scale, dt)
    # NOTE: suffix part + stand-alone merge, not the fused suffix pass (rows_partial with out=): device call 2
    # measured the fused epilogue at 38.3 us against 26.7 + 8.2 us for the two launches (shared document, one
    # layer; each event-timed launch carries ~8-10 us of launch latency, so the pair is ~11 us faster on the GPU)
    rows_partial(o_part[splits], lse_part[splits], q, k_cache, v_cache, tables, sufs, lens, scale, dt)
    merge_partials(out, None, o_part, lse_part, sufs, dt)
    return out
