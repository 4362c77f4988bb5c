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

from .compile import U64_MAX, load_function, num_sms


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


def write_kv(k, v, k_cache, v_cache, slot_mapping, *, check=True):
    """Write K/V rows into their slots (see :func:`pagedkv.kernels.ops.write_kv`).

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
