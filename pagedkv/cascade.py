"""Cascade attention (issue 17): decode rows that share a run of KV blocks read it once per group.

A group is a set of decode rows whose block tables start with the same block ids (the prefix cache and
``fork_sequence`` make them identical). Its shared *whole* blocks go through one prefix pass for all its rows;
each row's remaining keys (its suffix) through a per-row pass; the two are merged by log-sum-exp::

    row r    [ b7 b3 b9 b4 | b12 b13 ]   context_lens[r] = 90, block_size 16
    row s    [ b7 b3 b9 b4 | b20 ]       context_lens[s] = 70
             |<- prefix -->|              prefix_lens[g] = 64 (4 whole blocks), suffix_starts[r] = suffix_starts[s] = 64
    out[r] = merge( prefix pass (q_r, q_s against keys 0..63, read once),  suffix pass (q_r against keys 64..89) )

Only whole blocks strictly before a row's last block are shared (the block a row writes its new token into is
its own: copy-on-write makes it so), so every suffix holds at least the row's newest key.

This module: the plan (:class:`CascadePlan`: which rows form which group, how long each prefix is), the
detection (:func:`find_groups`), the rule that says when it pays (:class:`CascadeRule`), and the op
(:func:`cascade_attention`: GPU kernels, or the float64 reference on the host).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import is_gpu_array
from .kernels import reference_cascade


@dataclass(slots=True)
class CascadePlan:
    """Groups of decode rows and their shared prefixes, as host int32 arrays (the kernels' layout).

    ``group_starts`` [num_groups + 1]: group g owns ``group_rows[group_starts[g]:group_starts[g + 1]]``;
    ``prefix_lens`` [num_groups]: shared keys of each group (whole blocks); ``suffix_starts`` [num_rows]: the
    first key of each row's own pass (its group's prefix length, 0 for rows in no group).
    """

    group_starts: np.ndarray
    group_rows: np.ndarray
    prefix_lens: np.ndarray
    suffix_starts: np.ndarray

    def __post_init__(self):
        self.group_starts, self.group_rows, self.prefix_lens, self.suffix_starts = (
            np.ascontiguousarray(a, dtype=np.int32) for a in (self.group_starts, self.group_rows, self.prefix_lens,
                                                              self.suffix_starts))
        starts, rows, num_rows = self.group_starts, self.group_rows, len(self.suffix_starts)
        if starts.ndim != 1 or len(starts) != len(self.prefix_lens) + 1 or (len(starts) and starts[0] != 0):
            raise ValueError(f"group_starts must be [num_groups + 1] from 0, got {starts.tolist()} for "
                             f"{len(self.prefix_lens)} groups")
        if np.any(np.diff(starts) < 0) or starts[-1] > len(rows):
            raise ValueError(f"group_starts {starts.tolist()} must be non-decreasing and <= len(group_rows)="
                             f"{len(rows)}")
        used = rows[:starts[-1]]
        if used.size and (used.min() < 0 or used.max() >= num_rows or np.unique(used).size != used.size):
            raise ValueError(f"group_rows {used.tolist()} must be distinct rows in [0, {num_rows})")
        if np.any(self.prefix_lens < 0):
            raise ValueError(f"prefix_lens {self.prefix_lens.tolist()} must be >= 0")
        expect = np.zeros(num_rows, dtype=np.int32)
        expect[used] = np.repeat(self.prefix_lens, np.diff(starts))
        if not np.array_equal(expect, self.suffix_starts):
            bad = int(np.flatnonzero(expect != self.suffix_starts)[0])
            raise ValueError(f"suffix_starts[{bad}]={int(self.suffix_starts[bad])}, but its group's prefix is "
                             f"{int(expect[bad])} keys (0 for a row in no group)")

    @property
    def num_groups(self) -> int:
        return len(self.prefix_lens)

    @property
    def num_rows(self) -> int:
        return len(self.suffix_starts)

    @classmethod
    def from_groups(cls, groups, num_rows: int) -> "CascadePlan":
        """``groups``: ``(rows, prefix_len)`` pairs (rows: a sequence of row ids)."""
        sizes = [len(rows) for rows, _ in groups]
        rows = np.concatenate([np.asarray(r, dtype=np.int32) for r, _ in groups]) if groups else np.zeros(0, np.int32)
        plens = np.asarray([p for _, p in groups], dtype=np.int32)
        suffix = np.zeros(num_rows, dtype=np.int32)
        suffix[rows] = np.repeat(plens, sizes)
        return cls(np.r_[0, np.cumsum(sizes)], rows, plens, suffix)

    def saved_tokens(self) -> int:
        """Key reads the plan saves per layer: each group's prefix is read once instead of once per row."""
        return int(np.dot(np.diff(self.group_starts) - 1, self.prefix_lens)) if self.num_groups else 0

    def check_tables(self, block_tables, context_lens, block_size: int) -> None:
        """Raise ``ValueError`` unless every group's prefix is whole blocks that head each member's table and lie
        before its last block (host arrays)."""
        tables, lens = np.asarray(block_tables), np.asarray(context_lens)
        for g in range(self.num_groups):
            members = self.group_rows[self.group_starts[g]:self.group_starts[g + 1]]
            plen = int(self.prefix_lens[g])
            if plen % block_size:
                raise ValueError(f"prefix_lens[{g}]={plen} is not a multiple of block_size={block_size}")
            width = plen // block_size
            short = members[lens[members] <= plen]
            if short.size:
                raise ValueError(f"row {int(short[0])} of group {g} has {int(lens[short[0]])} keys <= its prefix "
                                 f"{plen}")
            differ = np.flatnonzero((tables[members, :width] != tables[members[:1], :width]).any(axis=1))
            if differ.size:
                raise ValueError(f"row {int(members[differ[0]])} of group {g} does not share the group's first "
                                 f"{width} blocks")


def find_groups(block_tables, context_lens, block_size: int, *, min_group_size: int = 2,
                min_prefix_blocks: int = 1) -> list[tuple[np.ndarray, int]]:
    """Groups of rows whose tables start with the same block ids: ``(rows, prefix_len)`` pairs.

    Rows are grouped by their first block id; a group's prefix is the longest run of whole blocks every member
    shares, each member's last block (where its newest key lives) excluded. Groups smaller than
    ``min_group_size`` or with fewer than ``min_prefix_blocks`` shared blocks are dropped. Host arrays:
    ``block_tables`` [rows, max_blocks], ``context_lens`` [rows].
    """
    tables, lens = np.asarray(block_tables), np.asarray(context_lens, dtype=np.int64)
    usable = (lens - 1) // block_size  # whole blocks before the block of the newest key
    candidates = np.flatnonzero(usable >= min_prefix_blocks)
    if candidates.size < min_group_size:
        return []
    first = tables[candidates, 0]
    order = candidates[np.argsort(first, kind="stable")]
    cuts = np.flatnonzero(np.diff(tables[order, 0])) + 1
    groups = []
    for members in np.split(order, cuts):
        if members.size < min_group_size:
            continue
        width = int(usable[members].min())
        same = (tables[members, :width] == tables[members[0], :width]).all(axis=0)
        shared = width if same.all() else int(np.argmin(same))
        if shared >= min_prefix_blocks:
            groups.append((np.sort(members), shared * block_size))
    return groups


@dataclass(frozen=True, slots=True)
class CascadeRule:
    """When cascade pays, per step: groups of at least ``min_group_size`` rows sharing at least
    ``min_prefix_tokens`` keys qualify; the step uses cascade when the qualifying groups save at least
    ``min_saved_tokens`` key reads per layer (``sum_g (size_g - 1) * prefix_g``).

    NOTE: the defaults come from ``python -m experiments.cascade_bench`` (kernels_cu/NOTES_cascade.md): below
    them the two extra launches per layer and the slower per-row suffix kernel cost more than the prefix
    reads they save.
    """

    min_group_size: int = 2
    min_prefix_tokens: int = 256
    min_saved_tokens: int = 16384

    def __post_init__(self):
        for name in ("min_group_size", "min_prefix_tokens", "min_saved_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (2 if name == "min_group_size" else 0):
                raise ValueError(f"{name} must be an int >= {2 if name == 'min_group_size' else 0}, got {value!r}")

    def plan(self, block_tables, context_lens, block_size: int) -> CascadePlan | None:
        """The step's plan when cascade pays, else None (host arrays of the step's real rows)."""
        min_blocks = max(1, -(-self.min_prefix_tokens // block_size))
        groups = find_groups(block_tables, context_lens, block_size, min_group_size=self.min_group_size,
                             min_prefix_blocks=min_blocks)
        saved = sum((len(rows) - 1) * plen for rows, plen in groups)
        if not groups or saved < self.min_saved_tokens:
            return None
        return CascadePlan.from_groups(groups, len(context_lens))


def cascade_attention(q, k_cache, v_cache, block_tables, context_lens, group_starts, group_rows, prefix_lens,
                      suffix_starts, *, scale=None, out=None, num_splits=None, kv_dtype=None):
    """Decode attention of every row over its ``context_lens[row]`` keys, the grouped rows' shared prefixes read
    once per group (arguments: :class:`CascadePlan`'s arrays; device arrays run the kernels of
    ``kernels_cu/cascade_attention.cu``, host arrays the float64 reference).

    Args:
        q: [rows, num_qo_heads, head_dim]; k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim].
        block_tables: [rows, max_blocks] int32; context_lens: [rows] int32.
        group_starts, group_rows, prefix_lens, suffix_starts: the plan (see :class:`CascadePlan`); the caller
            guarantees that each group's prefix blocks head every member's table (``CascadePlan.check_tables``).
        scale: softmax scale (default ``head_dim ** -0.5``); out: optional [rows, num_qo_heads, head_dim].
        num_splits: prefix splits of the tensor-core kernel (GPU; default: enough blocks for the device).
        kv_dtype: ``"bfloat16"`` marks uint16 device arrays as bfloat16 bits (a CuPy without bfloat16).
    Returns:
        out, q's dtype.
    """
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    if q.ndim != 3 or k_cache.ndim != 4 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"q {q.shape} does not match the cache {k_cache.shape}")
    if is_gpu_array(q):
        from .kernels import cascade as kernels_cascade

        return kernels_cascade.cascade_attention(q, k_cache, v_cache, block_tables, context_lens, group_starts,
                                                 group_rows, prefix_lens, suffix_starts, scale=scale, out=out,
                                                 num_splits=num_splits, kv_dtype=kv_dtype)
    result = reference_cascade.cascade_attention(q, k_cache, v_cache, block_tables, context_lens, group_starts,
                                                 group_rows, prefix_lens, suffix_starts, scale=scale)
    if out is None:
        return result.astype(q.dtype)
    out[...] = result
    return out
