"""The kernel-facing API: paged decode and prefill attention, KV writes by slot, block copies.

Every call validates its inputs first (dtype, shape, index ranges) and raises ``ValueError`` naming the
bad value before anything is written. NumPy inputs run on the host (attention through
:mod:`pagedkv.kernels.reference`); device inputs (CuPy, or anything with ``__cuda_array_interface__`` /
DLPack, e.g. a CUDA torch tensor, zero-copy) run the CUDA kernels of ``kernels_cu/`` through the launchers
:mod:`~pagedkv.kernels.decode`, :mod:`~pagedkv.kernels.prefill` and :mod:`~pagedkv.kernels.cache_ops`.

Layouts (one layer; the pool adds a leading ``num_layers`` axis):

    k_cache, v_cache   [num_blocks, num_kv_heads, block_size, head_dim]
    slot               block_id * block_size + offset_in_block   (-1 in slot_mapping = skip)

fp8 caches (:mod:`pagedkv.fp8`): uint8 pools of fp8 bytes, named by ``kv_dtype="fp8_e4m3" | "fp8_e5m2"`` with
per-call ``k_scale`` / ``v_scale``; ``write_kv`` quantizes, the attention ops read the dequantized bytes, and
``copy_blocks`` copies bytes whatever the pool's dtype. q, k, v and out stay in the model's dtype.
"""
from __future__ import annotations

import numpy as np

from .. import fp8
from ..backend import SUPPORTED_DTYPES, is_gpu_array
from . import cache_ops, decode, prefill, reference
from .cache_ops import check_copy_ranges_host
from .decode import VERSIONS


def _as_device(a):
    """A CuPy view of a device array (zero-copy through ``__cuda_array_interface__`` or DLPack)."""
    import cupy

    if isinstance(a, cupy.ndarray):
        return a
    try:
        return cupy.asarray(a)
    except Exception:  # e.g. a bfloat16 torch tensor, which __cuda_array_interface__ cannot describe
        return cupy.from_dlpack(a)


def _check_int_array(name: str, a, ndim: int) -> None:
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be a {ndim}-D integer array, got shape {a.shape} dtype {a.dtype}")


def check_kv_format(k_cache, kv_dtype, k_scale, v_scale):
    """The cache format of a call: ``(None, 1.0, 1.0)`` for a cache in the model's dtype, else the canonical
    fp8 name and the two scales as floats. An fp8 ``kv_dtype`` needs uint8 caches and finite scales > 0; a
    uint8 cache needs an fp8 ``kv_dtype``."""
    is_bytes = np.dtype(k_cache.dtype) == np.uint8
    if kv_dtype is None or kv_dtype in ("auto", "bfloat16", "bf16"):
        if is_bytes:
            raise ValueError(f"a uint8 cache holds fp8 bytes: pass kv_dtype as one of {fp8.FP8_DTYPES}")
        return None, 1.0, 1.0
    kv_dtype = fp8.check_kv_dtype(kv_dtype)
    if not is_bytes:
        raise ValueError(f"kv_dtype={kv_dtype!r} needs uint8 caches, got {k_cache.dtype}")
    return kv_dtype, fp8.check_scale("k_scale", k_scale), fp8.check_scale("v_scale", v_scale)


def check_cache_pair(k_cache, v_cache, ndim: int = 4, allow_bytes: bool = False) -> None:
    """k/v caches: same shape and dtype, supported dtype (uint8 fp8 bytes with ``allow_bytes``), C-contiguous,
    ``ndim`` dimensions."""
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"k_cache {k_cache.shape} {k_cache.dtype} and v_cache {v_cache.shape} {v_cache.dtype} differ"
        )
    if k_cache.ndim != ndim:
        raise ValueError(f"cache must have {ndim} dimensions, got shape {k_cache.shape}")
    if np.dtype(k_cache.dtype) not in SUPPORTED_DTYPES and not (allow_bytes and k_cache.dtype == np.uint8):
        raise ValueError(f"cache dtype must be float16, bfloat16 or float32, got {k_cache.dtype}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not c.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")


def _check_arrays(**arrays) -> None:
    for name, a in arrays.items():
        if not (hasattr(a, "shape") and hasattr(a, "dtype") and hasattr(a, "ndim")):
            raise ValueError(f"{name} must be an array, got {type(a).__name__}")


def _check_q_against_cache(q, k_cache, rows: str, fp8_cache: bool) -> None:
    """q is [rows, num_qo_heads, head_dim] of the cache's head_dim, its dtype the cache's (an fp8 cache: any model
    dtype), and its heads a multiple of the cache's KV heads."""
    _, num_kv_heads, _, head_dim = k_cache.shape
    if q.ndim != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q must be [{rows}, num_qo_heads, head_dim={head_dim}], got shape {q.shape}")
    if fp8_cache and np.dtype(q.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if not fp8_cache and q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} differs from the cache dtype {k_cache.dtype}")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"num_qo_heads={q.shape[1]} is not divisible by num_kv_heads={num_kv_heads}")


def check_attention_args(q, k_cache, v_cache, block_tables, context_lens, version: int | None = None,
                         fp8_cache: bool = False) -> None:
    """Shape and dtype checks for :func:`paged_attention` (metadata only: no data is read)."""
    _check_arrays(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens)
    if version is not None and version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS} or None, got {version!r}")
    check_cache_pair(k_cache, v_cache, allow_bytes=fp8_cache)
    _check_q_against_cache(q, k_cache, "batch", fp8_cache)
    _check_int_array("block_tables", block_tables, 2)
    _check_int_array("context_lens", context_lens, 1)
    if block_tables.shape[0] != q.shape[0] or context_lens.shape[0] != q.shape[0]:
        raise ValueError(
            f"batch mismatch: q {q.shape[0]}, block_tables {block_tables.shape[0]}, "
            f"context_lens {context_lens.shape[0]}"
        )


def check_ranges_host(block_tables, context_lens, num_blocks: int, block_size: int) -> None:
    """Index checks on host arrays: lengths in ``[1, max_blocks * block_size]``, used entries in range."""
    block_tables, context_lens = np.asarray(block_tables), np.asarray(context_lens)
    capacity = block_tables.shape[1] * block_size
    bad = np.flatnonzero((context_lens < 1) | (context_lens > capacity))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"context_lens[{i}]={int(context_lens[i])} outside [1, {capacity}] (max_blocks * block_size)"
        )
    used = np.arange(block_tables.shape[1])[None, :] < -(-context_lens[:, None] // block_size)
    bad_entry = used & ((block_tables < 0) | (block_tables >= num_blocks))
    if bad_entry.any():
        i, j = map(int, np.argwhere(bad_entry)[0])
        raise ValueError(f"block_tables[{i}, {j}]={int(block_tables[i, j])} outside [0, {num_blocks})")


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, *, scale=None, version=None, out=None,
                    check=True, kv_dtype=None, k_scale=1.0, v_scale=1.0, split=None):
    """Decode attention: one query token per sequence over its paged K/V.

    Args:
        q: [batch, num_qo_heads, head_dim], the cache's dtype.
        k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim].
        block_tables: [batch, max_blocks] int32; entries past a sequence's blocks are not read.
        context_lens: [batch] int32, each in ``[1, max_blocks * block_size]``.
        scale: softmax scale, default ``head_dim ** -0.5``.
        version: 1 (two-pass, correctness first), 2 (one-pass online softmax, split-K by the table's
            capacity) or 3 (kernel 2's tile loop in a persistent grid, split-K balanced over the batch on the
            device), 4 (tensor cores for GQA groups, opt-in: head_dim 64 / 128, float16 / bfloat16 q;
            ``pagedkv.kernels.decode_tc``); None: the default, kernel 3's launch with its on-device dispatcher
            (the walk or a partition plan per launch, ``pagedkv.kernels.decode.DEFAULT_VERSION``). GPU only; the host
            path always uses the float64 reference.
        out: optional [batch, num_qo_heads, head_dim] output, q's dtype.
        check: validate index ranges (on the GPU: one reduction). Turn off only for benchmarks.
        kv_dtype, k_scale, v_scale: an fp8 cache (uint8 bytes) and its scales; None: the cache is in q's dtype.
        split: version 4's cut of each sequence into partitions (GPU; ``pagedkv.kernels.decode_tc.SPLITS``).
    Returns:
        out: [batch, num_qo_heads, head_dim], q's dtype.
    """
    _check_arrays(k_cache=k_cache)
    kv_dtype, k_scale, v_scale = check_kv_format(k_cache, kv_dtype, k_scale, v_scale)
    if is_gpu_array(q):
        q, k_cache, v_cache = _as_device(q), _as_device(k_cache), _as_device(v_cache)
        block_tables, context_lens = _as_device(block_tables), _as_device(context_lens)
        check_attention_args(q, k_cache, v_cache, block_tables, context_lens, version, kv_dtype is not None)
        out = None if out is None else _as_device(out)
        fp8_args = {} if kv_dtype is None else {"kv_dtype": kv_dtype, "k_scale": k_scale, "v_scale": v_scale}
        return decode.paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                       scale=scale, version=version, out=out, check=check, split=split, **fp8_args)
    check_attention_args(q, k_cache, v_cache, block_tables, context_lens, version, kv_dtype is not None)
    if check:
        check_ranges_host(block_tables, context_lens, k_cache.shape[0], k_cache.shape[2])
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out must be {q.shape} {q.dtype}, got {out.shape} {out.dtype}")
    result = reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale=scale,
                                              kv_dtype=kv_dtype, k_scale=k_scale, v_scale=v_scale)
    if out is None:
        return result.astype(q.dtype)
    out[...] = result
    return out


def check_prefill_args(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale=None,
                       out=None, fp8_cache: bool = False) -> None:
    """Shape and dtype checks for :func:`prefill_attention` (metadata only: no data is read)."""
    _check_arrays(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                  query_start_loc=query_start_loc, context_lens=context_lens)
    check_cache_pair(k_cache, v_cache, allow_bytes=fp8_cache)
    _check_q_against_cache(q, k_cache, "num_tokens", fp8_cache)
    _check_int_array("block_tables", block_tables, 2)
    _check_int_array("query_start_loc", query_start_loc, 1)
    _check_int_array("context_lens", context_lens, 1)
    num_seqs = context_lens.shape[0]
    if block_tables.shape[0] != num_seqs or query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(f"batch mismatch: context_lens {num_seqs} sequences, block_tables {block_tables.shape[0]}, "
                         f"query_start_loc {query_start_loc.shape[0]} entries (must be num_seqs + 1)")
    if scale is not None and not (isinstance(scale, (int, float, np.floating, np.integer)) and np.isfinite(scale)
                                  and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if out is not None and (getattr(out, "shape", None) != q.shape or getattr(out, "dtype", None) != q.dtype):
        raise ValueError(f"out must be {q.shape} {q.dtype}, got {getattr(out, 'shape', type(out).__name__)} "
                         f"{getattr(out, 'dtype', '')}")


def check_prefill_ranges_host(block_tables, query_start_loc, context_lens, num_blocks: int, block_size: int,
                              num_tokens: int) -> None:
    """Index checks on host arrays: starts non-decreasing in ``[0, num_tokens]``; each length in
    ``[n_i, max_blocks * block_size]``; the used entries of sequences with new tokens in range."""
    tables, starts, lens = (np.asarray(a, dtype=np.int64) for a in (block_tables, query_start_loc, context_lens))
    bad = np.flatnonzero(np.diff(starts, prepend=0) < 0)
    if bad.size or starts[-1] > num_tokens:
        i = int(bad[0]) if bad.size else len(starts) - 1
        raise ValueError(f"query_start_loc[{i}]={int(starts[i])}: query_start_loc must be non-decreasing, "
                         f"from >= 0 to <= num_tokens={num_tokens}")
    new, capacity = np.diff(starts), tables.shape[1] * block_size
    bad = np.flatnonzero((lens < new) | (lens > capacity))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"context_lens[{i}]={int(lens[i])} outside [{int(new[i])}, {capacity}] "
                         f"(its new tokens .. max_blocks * block_size)")
    used = (np.arange(tables.shape[1])[None, :] < -(-lens[:, None] // block_size)) & (new[:, None] > 0)
    bad_entry = used & ((tables < 0) | (tables >= num_blocks))
    if bad_entry.any():
        i, j = map(int, np.argwhere(bad_entry)[0])
        raise ValueError(f"block_tables[{i}, {j}]={int(tables[i, j])} outside [0, {num_blocks})")


def owned_rows(query_start_loc, num_tokens: int) -> np.ndarray:
    """Host bool mask [num_tokens]: the q rows some sequence owns (``qsl[i] <= row < qsl[i + 1]``)."""
    mask = np.zeros(num_tokens, dtype=bool)
    starts = np.asarray(query_start_loc, dtype=np.int64)
    for a, b in zip(starts[:-1], starts[1:]):
        mask[a:b] = True
    return mask


def prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, *, scale=None, out=None,
                      check=True, kv_dtype=None, k_scale=1.0, v_scale=1.0):
    """Causal prefill attention: the new tokens of each sequence attend its paged K/V (cached prefix included).

    The new tokens' K/V must already be in the cache (``write_kv`` first)::

        q rows        a0 a1 a2 | b0 b1 | pad         query_start_loc = [0, 3, 5]  (row 5: padding, untouched)
        context_lens  3        | 6                   sequence b: 4 cached tokens + 2 new
        positions     0  1  2  | 4  5                token j of sequence i: context_lens[i] - n_i + j

    Args:
        q: [num_tokens, num_qo_heads, head_dim], the cache's dtype.
        k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim].
        block_tables: [num_seqs, max_blocks] int32; entries past a sequence's blocks are not read.
        query_start_loc: [num_seqs + 1] int32, non-decreasing from >= 0 to <= num_tokens: sequence i owns q rows
            ``qsl[i] .. qsl[i+1]-1`` (``n_i`` new tokens; 0 = a padding sequence, skipped). Rows no sequence
            owns (e.g. after ``qsl[-1]``) are never written.
        context_lens: [num_seqs] int32 in ``[n_i, max_blocks * block_size]``: tokens in the cache, new ones included.
        scale: softmax scale > 0, default ``head_dim ** -0.5``.
        out: optional [num_tokens, num_qo_heads, head_dim], q's dtype; only owned rows are written.
        check: validate index ranges (on the GPU: one small kernel and a sync). Off only for trusted metadata.
        kv_dtype, k_scale, v_scale: an fp8 cache (uint8 bytes) and its scales; None: the cache is in q's dtype.
    Returns:
        out (a new array when not given: rows no sequence owns are 0).
    """
    _check_arrays(k_cache=k_cache)
    kv_dtype, k_scale, v_scale = check_kv_format(k_cache, kv_dtype, k_scale, v_scale)
    fp8_cache = kv_dtype is not None
    if is_gpu_array(q):
        arrays = map(_as_device, (q, k_cache, v_cache, block_tables, query_start_loc, context_lens))
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens = arrays
        out = None if out is None else _as_device(out)
        check_prefill_args(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, out, fp8_cache)
        fp8_args = {} if kv_dtype is None else {"kv_dtype": kv_dtype, "k_scale": k_scale, "v_scale": v_scale}
        return prefill.prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens,
                                                 scale=scale, out=out, check=check, **fp8_args)
    check_prefill_args(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, out, fp8_cache)
    if check:
        check_prefill_ranges_host(block_tables, query_start_loc, context_lens, k_cache.shape[0], k_cache.shape[2],
                                  q.shape[0])
    result = reference.prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale=scale,
                                         kv_dtype=kv_dtype, k_scale=k_scale, v_scale=v_scale)
    rows = owned_rows(query_start_loc, q.shape[0])
    if out is None:
        out = np.zeros(q.shape, dtype=q.dtype)
    out[rows] = result[rows]
    return out


def check_write_args(k, v, k_cache, v_cache, slot_mapping, fp8_cache: bool = False) -> None:
    """Shape and dtype checks for :func:`write_kv`."""
    _check_arrays(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    check_cache_pair(k_cache, v_cache, allow_bytes=fp8_cache)
    _, num_kv_heads, _, head_dim = k_cache.shape
    for name, x in (("k", k), ("v", v)):
        if x.ndim != 3 or x.shape[1:] != (num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must be [num_tokens, num_kv_heads={num_kv_heads}, head_dim={head_dim}], got {x.shape}"
            )
        if fp8_cache and np.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype must be float16, bfloat16 or float32, got {x.dtype}")
        if not fp8_cache and x.dtype != k_cache.dtype:
            raise ValueError(f"{name} dtype {x.dtype} differs from the cache dtype {k_cache.dtype}")
    _check_int_array("slot_mapping", slot_mapping, 1)
    if not k.shape[0] == v.shape[0] == slot_mapping.shape[0]:
        raise ValueError(
            f"token count mismatch: k {k.shape[0]}, v {v.shape[0]}, slot_mapping {slot_mapping.shape[0]}"
        )


def write_kv(k, v, k_cache, v_cache, slot_mapping, *, check=True, kv_dtype=None, k_scale=1.0, v_scale=1.0):
    """Write each token's K/V into its slot of one layer's cache (slot -1: skip that token).

    Args:
        k, v: [num_tokens, num_kv_heads, head_dim], the cache's dtype (fp8 cache: float16/bfloat16/float32).
        k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim], written in place.
        slot_mapping: [num_tokens] int; ``block_id * block_size + offset`` or -1. No slot twice.
        kv_dtype, k_scale, v_scale: an fp8 cache (uint8): stores ``fp8(sat(x / scale))``, round to nearest even.
    """
    _check_arrays(k_cache=k_cache)
    kv_dtype, k_scale, v_scale = check_kv_format(k_cache, kv_dtype, k_scale, v_scale)
    fp8_cache = kv_dtype is not None
    if is_gpu_array(k_cache):
        k, v, k_cache, v_cache = map(_as_device, (k, v, k_cache, v_cache))
        slot_mapping = _as_device(slot_mapping)
        check_write_args(k, v, k_cache, v_cache, slot_mapping, fp8_cache)
        fp8_args = {} if kv_dtype is None else {"kv_dtype": kv_dtype, "k_scale": k_scale, "v_scale": v_scale}
        return cache_ops.write_kv(k, v, k_cache, v_cache, slot_mapping, check=check, **fp8_args)
    check_write_args(k, v, k_cache, v_cache, slot_mapping, fp8_cache)
    num_blocks, _, block_size, _ = k_cache.shape
    slots = np.asarray(slot_mapping, dtype=np.int64)
    if check:
        check_slots_host(slots, num_blocks * block_size)
    keep = slots >= 0
    blocks, offsets = np.divmod(slots[keep], block_size)
    if fp8_cache:
        k, v = fp8.quantize(k, kv_dtype, k_scale), fp8.quantize(v, kv_dtype, v_scale)
    k_cache[blocks, :, offsets] = k[keep]
    v_cache[blocks, :, offsets] = v[keep]


def check_slots_host(slots: np.ndarray, num_slots: int) -> None:
    bad = np.flatnonzero((slots < -1) | (slots >= num_slots))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"slot_mapping[{i}]={int(slots[i])} outside [-1, {num_slots})")
    valid = slots[slots >= 0]
    if np.unique(valid).size != valid.size:
        raise ValueError("slot_mapping names a slot twice")


def check_copy_args(k_pool, v_pool, src, dst) -> None:
    """Shape checks for :func:`copy_blocks` (pools carry a leading ``num_layers`` axis; any pool dtype, uint8
    fp8 bytes included: the copy moves bytes)."""
    check_cache_pair(k_pool, v_pool, ndim=5, allow_bytes=True)
    _check_int_array("src_block_ids", src, 1)
    _check_int_array("dst_block_ids", dst, 1)
    if src.shape != dst.shape:
        raise ValueError(f"src_block_ids {src.shape} and dst_block_ids {dst.shape} differ in length")


def copy_blocks(k_pool, v_pool, src_block_ids, dst_block_ids, *, check=True):
    """Copy whole blocks ``src[i] -> dst[i]`` in every layer's K and V pool (copy-on-write).

    Args:
        k_pool, v_pool: [num_layers, num_blocks, num_kv_heads, block_size, head_dim], in place.
        src_block_ids, dst_block_ids: [num_pairs] int. Destinations distinct and never a source.
    """
    if is_gpu_array(k_pool):
        k_pool, v_pool = _as_device(k_pool), _as_device(v_pool)
        src, dst = _as_device(src_block_ids), _as_device(dst_block_ids)
        check_copy_args(k_pool, v_pool, src, dst)
        return cache_ops.copy_blocks(k_pool, v_pool, src, dst, check=check)
    src, dst = np.asarray(src_block_ids), np.asarray(dst_block_ids)
    check_copy_args(k_pool, v_pool, src, dst)
    if check:
        check_copy_ranges_host(src.astype(np.int64), dst.astype(np.int64), k_pool.shape[1])
    k_pool[:, dst] = k_pool[:, src]
    v_pool[:, dst] = v_pool[:, src]
