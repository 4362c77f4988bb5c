"""Launchers of ``kernels_cu/cache_ops.cu``: K/V writes by slot, whole-block copies, the GPU index check.

The launchers take CuPy arrays already shape/dtype-checked by :mod:`pagedkv.kernels.ops`; they check what
only they know (contiguity, the widest word that divides rows and addresses) and the index ranges.

Layouts (the pool adds a leading ``num_layers`` axis to one layer's cache)::

    k_cache, v_cache   [num_blocks, num_kv_heads, block_size, head_dim]
    k_pool, v_pool     [num_layers, num_blocks, num_kv_heads, block_size, head_dim]
    slot               block_id * block_size + offset_in_block   (-1 in slot_mapping = skip)
"""
from __future__ import annotations

import math

import numpy as np

from ..fp8 import FP8_CODES, check_device_supports_fp8, check_kv_dtype, check_scale
from .compile import DT_SUFFIXES, U64_MAX, dt_code, load_function, num_sms


def _word_bytes(row_bytes: int, arrays) -> int:
    """The widest word (16, 4, 2 or 1 bytes) dividing a row and every array's start address."""
    for w in (16, 4, 2, 1):  # NOTE: 1-byte words: fp8 (uint8) pools of odd-sized rows
        if row_bytes % w == 0 and all(a.data.ptr % w == 0 for a in arrays):
            return w
    raise ValueError(f"rows of {row_bytes} bytes cannot be copied")


def check_index_range(ids, lo: int, hi: int, name: str) -> None:
    """GPU-side: raise ``ValueError`` naming the first entry of int64 ``ids`` outside ``[lo, hi)``."""
    import cupy

    n = ids.size
    if n == 0:
        return
    bad = cupy.full(1, U64_MAX, dtype=cupy.uint64)
    grid = min(-(-n // 256), 4 * num_sms(cupy.cuda.Device().id))
    load_function("cache_ops.cu", "check_index_kernel")((grid,), (256,), (
        ids, cupy.int64(n), cupy.int64(lo), cupy.int64(hi), bad))
    i = int(bad.get()[0])
    if i != U64_MAX:
        raise ValueError(f"{name}[{i}]={int(ids[i])} outside [{lo}, {hi})")


def check_copy_ranges_host(src: np.ndarray, dst: np.ndarray, num_blocks: int) -> None:
    """Host check of a copy's block ids: in ``[0, num_blocks)``, destinations distinct, none also a source."""
    for name, ids in (("src_block_ids", src), ("dst_block_ids", dst)):
        bad = np.flatnonzero((ids < 0) | (ids >= num_blocks))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{name}[{i}]={int(ids[i])} outside [0, {num_blocks})")
    if np.unique(dst).size != dst.size:
        raise ValueError("dst_block_ids names a block twice")
    if np.intersect1d(src, dst).size:
        raise ValueError(f"blocks {np.intersect1d(src, dst).tolist()} are both a source and a destination")


def write_kv(k, v, k_cache, v_cache, slot_mapping, *, check=True, kv_dtype=None, k_scale=1.0, v_scale=1.0):
    """Write K/V rows into their slots (see :func:`pagedkv.kernels.ops.write_kv`); ``kv_dtype`` fp8: quantize
    into uint8 caches with the two scales (:func:`write_kv_fp8`).

    With ``check`` the slot range is verified on the GPU; duplicate slots are *not* detected on the GPU
    (the caller's contract; the host path checks them).
    """
    import cupy

    if kv_dtype is not None:
        return write_kv_fp8(k, v, k_cache, v_cache, slot_mapping, kv_dtype, k_scale, v_scale, check=check)

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
    load_function("cache_ops.cu", f"write_kv_w{word}")((slots.size,), (128,), (
        k_cache, v_cache, k, v, slots, cupy.int32(num_kv_heads), cupy.int32(block_size),
        cupy.int32(head_dim * k_cache.itemsize // word)))


def copy_blocks(k_pool, v_pool, src_block_ids, dst_block_ids, *, check=True):
    """``pool[:, dst[i]] = pool[:, src[i]]`` for K and V, every layer, one launch.

    With ``check`` the (few) ids are read back once and checked on the host: ranges, distinct
    destinations, no id both a source and a destination.
    """
    import cupy

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
    load_function("cache_ops.cu", f"copy_blocks_w{word}")((src.size, num_layers, 2), (256,), (
        k_pool, v_pool, src, dst, cupy.int64(num_blocks), cupy.int64(block_bytes // word)))


def write_kv_fp8(k, v, k_cache, v_cache, slot_mapping, kv_dtype, k_scale, v_scale, *, check=True):
    """Quantize K/V rows (float16 / bfloat16 / float32) into uint8 fp8 caches: ``fp8(sat(x / scale))``.

    One thread block per token, 8 elements per thread step: head_dim a multiple of 8, rows 16-byte aligned.
    Refused on a GPU without fp8 conversions (compute capability < 8.9).
    """
    import cupy

    num_blocks, num_kv_heads, block_size, head_dim = k_cache.shape
    fmt = FP8_CODES[check_kv_dtype(kv_dtype)]
    k_scale, v_scale = check_scale("k_scale", k_scale), check_scale("v_scale", v_scale)
    check_device_supports_fp8(cupy.cuda.Device().compute_capability)
    if k_cache.dtype != cupy.uint8 or v_cache.dtype != cupy.uint8:
        raise ValueError(f"fp8 caches must be uint8, got {k_cache.dtype} and {v_cache.dtype}")
    if head_dim % 8:
        raise ValueError(f"head_dim must be a multiple of 8 for fp8 writes, got {head_dim}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not c.flags.c_contiguous or c.data.ptr % 8:
            raise ValueError(f"{name} must be C-contiguous and 8-byte aligned")
    k, v = cupy.ascontiguousarray(k), cupy.ascontiguousarray(v)
    k, v = (x if x.data.ptr % 16 == 0 else x.copy() for x in (k, v))
    slots = cupy.ascontiguousarray(slot_mapping, dtype=cupy.int64)
    if check:
        check_index_range(slots, -1, num_blocks * block_size, "slot_mapping")
    if slots.size == 0:
        return
    suffix = DT_SUFFIXES[dt_code(k.dtype)] + {1: "_e4m3", 2: "_e5m2"}[fmt]
    load_function("cache_ops.cu", f"write_kv_fp8_{suffix}")((slots.size,), (128,), (
        k_cache, v_cache, k, v, slots, cupy.int32(num_kv_heads), cupy.int32(block_size), cupy.int32(head_dim),
        cupy.float32(k_scale), cupy.float32(v_scale)))


def prepare_dequant_gather(k_cache, v_cache, block_tables, query_start_loc, context_lens, kv_dtype: str, dt: int,
                           k_mul: float, v_mul: float):
    """The blocks a prefill reads from uint8 fp8 caches, as a 16-bit (``dt`` 1 float16 / 2 bfloat16) scratch pool
    in table order: ``(k_scratch, v_scratch, tables, launch)``. Sequence i's j-th block lands in scratch block
    ``tables[i, j] = i * max_blocks + j`` as ``dt(fp8 * mul)`` when ``launch()`` runs (the blocks of
    ``j < ceil(context_lens[i] / block_size)``, sequences with new tokens only); scratch allocated now, so the
    launch is captured in a CUDA graph like the kernel after it. int32 device arrays, checked by the caller.
    """
    import cupy

    _, num_kv_heads, block_size, head_dim = k_cache.shape
    num_seqs, max_blocks = block_tables.shape
    fmt = FP8_CODES[check_kv_dtype(kv_dtype)]
    dtype = cupy.float16 if dt == 1 else cupy.uint16  # NOTE: bfloat16 bits travel as uint16 (kv_dtype="bfloat16")
    shape = (num_seqs * max_blocks, num_kv_heads, block_size, head_dim)
    k_out, v_out = cupy.empty(shape, dtype=dtype), cupy.empty(shape, dtype=dtype)
    tables = cupy.arange(num_seqs * max_blocks, dtype=cupy.int32).reshape(num_seqs, max_blocks)
    block_bytes = num_kv_heads * block_size * head_dim
    kernel = load_function("cache_ops.cu", f"dequant_gather_fp8_{DT_SUFFIXES[dt]}_{'e4m3' if fmt == 1 else 'e5m2'}")
    args = (k_out, v_out, k_cache, v_cache, block_tables, query_start_loc, context_lens, cupy.int32(max_blocks),
            cupy.int32(block_size), cupy.int64(block_bytes), cupy.float32(k_mul), cupy.float32(v_mul))

    def launch():
        if num_seqs and max_blocks:
            kernel((max_blocks, num_seqs, 2), (128,), args)
    return k_out, v_out, tables, launch


def dequant_gather_bytes(num_seqs: int, max_blocks: int, num_kv_heads: int, block_size: int, head_dim: int) -> int:
    """The scratch of :func:`prepare_dequant_gather`: K and V, 2 bytes an element."""
    return 2 * 2 * num_seqs * max_blocks * num_kv_heads * block_size * head_dim
