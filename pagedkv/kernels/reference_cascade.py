"""Float64 references of cascade attention (issue 17): attention with log-sum-exp over a key range, the shared
prefix pass of a group, the per-row suffix pass and ``merge_attn_states``.

Shapes (inputs NumPy or device arrays; outputs float64 NumPy)::

    q                 [num_rows, num_qo_heads, head_dim]          one decode query per row
    k_cache, v_cache  [num_blocks, num_kv_heads, block_size, head_dim]
    block_tables      [num_rows, max_blocks];  context_lens [num_rows]
    group_starts      [num_groups + 1]; group_rows [>= group_starts[-1]]; prefix_lens [num_groups]
    suffix_starts     [num_rows]
    out               [num_rows, num_qo_heads, head_dim];  lse [num_rows, num_qo_heads]  (natural log)

An empty key range gives ``out = 0`` and ``lse = -inf``; merging with it changes nothing.
"""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from .reference import paged_gather


def _f64(a) -> np.ndarray:
    return to_numpy(a).astype(np.float64)


def attention_lse(q, k, v, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """softmax(scale q k^T) v and log sum exp(scale q k^T) per query head, no mask.

    q: [n, num_qo_heads, d]; k, v: [m, num_kv_heads, d] (m may be 0). Returns ([n, Hq, d], [n, Hq]).
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    n, num_qo_heads, d = q.shape
    m, num_kv_heads, _ = k.shape
    if m == 0:
        return np.zeros(q.shape), np.full((n, num_qo_heads), -np.inf)
    group = num_qo_heads // num_kv_heads
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("qhd,khd->qhk", q, k) * scale
    mx = s.max(axis=-1, keepdims=True)
    p = np.exp(s - mx)
    total = p.sum(axis=-1)
    out = np.einsum("qhk,khd->qhd", p, v) / total[..., None]
    return out, np.log(total) + mx[..., 0]


def rows_attention(q, k_cache, v_cache, block_tables, begin, end, *, scale=None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's keys ``[begin[row], end[row])`` through its own table (``begin`` None: 0)."""
    q = _f64(q)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    tables, end = to_numpy(block_tables), np.asarray(to_numpy(end), dtype=np.int64)
    begin = np.zeros_like(end) if begin is None else np.asarray(to_numpy(begin), dtype=np.int64)
    out, lse = np.zeros(q.shape), np.full(q.shape[:2], -np.inf)
    for r in range(q.shape[0]):
        a, b = int(begin[r]), int(end[r])
        if b <= a:
            continue
        k = paged_gather(k_cache, tables[r], b)[a:]
        v = paged_gather(v_cache, tables[r], b)[a:]
        out[r], lse[r] = (x[0] for x in attention_lse(q[r:r + 1], k, v, scale))
    return out, lse


def prefix_attention(q, k_cache, v_cache, block_tables, group_starts, group_rows, prefix_lens, *,
                     scale=None) -> tuple[np.ndarray, np.ndarray]:
    """Every row of group ``g`` against keys ``[0, prefix_lens[g])`` of the table of the group's first row;
    rows of no group (or of a group without a prefix): ``out = 0``, ``lse = -inf``."""
    q = _f64(q)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    tables = to_numpy(block_tables)
    starts, rows, plens = (np.asarray(to_numpy(a), dtype=np.int64) for a in (group_starts, group_rows, prefix_lens))
    out, lse = np.zeros(q.shape), np.full(q.shape[:2], -np.inf)
    for g in range(len(plens)):
        members = rows[starts[g]:starts[g + 1]]
        if plens[g] <= 0 or members.size == 0:
            continue
        k = paged_gather(k_cache, tables[members[0]], plens[g])
        v = paged_gather(v_cache, tables[members[0]], plens[g])
        out[members], lse[members] = attention_lse(q[members], k, v, scale)
    return out, lse


def merge_attn_states(outs, lses) -> tuple[np.ndarray, np.ndarray]:
    """Merge partial attention results of disjoint key sets: ``out = sum_i w_i out_i``, ``w_i = e^(lse_i - L)``,
    ``L = log sum_i e^(lse_i)``. outs: sequence of [rows, heads, d]; lses: of [rows, heads]."""
    outs = [np.asarray(_f64(o)) for o in outs]
    lses = np.stack([_f64(x) for x in lses])  # [parts, rows, heads]
    mx = lses.max(axis=0)
    safe = np.where(np.isfinite(mx), mx, 0.0)
    w = np.exp(lses - safe)  # 0 for empty parts
    total = w.sum(axis=0)
    out = np.zeros(outs[0].shape)
    for wi, oi in zip(w, outs):
        out += np.where(wi[..., None] > 0, wi[..., None] * np.nan_to_num(oi), 0.0)
    nonempty = total > 0
    out[nonempty] /= total[nonempty][..., None]
    lse = np.where(nonempty, np.log(np.where(nonempty, total, 1.0)) + safe, -np.inf)
    return out, lse


def cascade_attention(q, k_cache, v_cache, block_tables, context_lens, group_starts, group_rows, prefix_lens,
                      suffix_starts, *, scale=None) -> np.ndarray:
    """The prefix pass of the grouped rows, each row's suffix ``[suffix_starts, context_lens)``, merged."""
    pre = prefix_attention(q, k_cache, v_cache, block_tables, group_starts, group_rows, prefix_lens, scale=scale)
    suf = rows_attention(q, k_cache, v_cache, block_tables, suffix_starts, context_lens, scale=scale)
    return merge_attn_states((pre[0], suf[0]), (pre[1], suf[1]))[0]
