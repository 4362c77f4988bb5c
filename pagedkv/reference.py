"""Float64 NumPy references: the ground truth every cache operation and kernel is checked against.

Shapes (all inputs may be NumPy or device arrays; outputs are float64 NumPy arrays):

    q                       [num_q, num_qo_heads, head_dim]          dense attention
    k, v                    [num_kv, num_kv_heads, head_dim]
    k_cache, v_cache        [num_blocks, num_kv_heads, block_size, head_dim]   one layer of the pool
    block_table             [max_blocks] int   (only the first ceil(context_len / block_size) are read)
    block_tables            [batch, max_blocks] int
    context_lens            [batch] int

Query head ``h`` reads KV head ``h // (num_qo_heads // num_kv_heads)`` (MHA, GQA and MQA alike).
"""
from __future__ import annotations

import numpy as np

from .backend import to_numpy


def _f64(a) -> np.ndarray:
    return to_numpy(a).astype(np.float64)


def dense_attention(q, k, v, *, scale: float | None = None, causal: bool = False) -> np.ndarray:
    """softmax(scale * q k^T) v per query head, in float64.

    With ``causal=True`` the queries are the *last* ``num_q`` positions of the ``num_kv`` keys:
    query ``i`` attends keys ``0 .. num_kv - num_q + i`` (prefill with or without a cached prefix).

    Returns:
        [num_q, num_qo_heads, head_dim] float64.
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    num_q, num_qo_heads, head_dim = q.shape
    num_kv, num_kv_heads, _ = k.shape
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"num_qo_heads={num_qo_heads} is not divisible by num_kv_heads={num_kv_heads}")
    group = num_qo_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else float(scale)
    k = np.repeat(k, group, axis=1)  # [num_kv, num_qo_heads, head_dim]
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        offset = num_kv - num_q
        allowed = np.arange(num_kv)[None, :] <= (np.arange(num_q)[:, None] + offset)
        scores = np.where(allowed[None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", probs, v)


def paged_gather(cache, block_table, context_len: int) -> np.ndarray:
    """Follow ``block_table`` through one layer's pool and return the first ``context_len`` tokens.

    Token ``t`` lives in block ``block_table[t // block_size]`` at offset ``t % block_size``.

    Returns:
        [context_len, num_kv_heads, head_dim], in the cache's dtype (an exact copy).
    """
    cache = to_numpy(cache)
    block_table = np.asarray(to_numpy(block_table), dtype=np.int64)
    block_size = cache.shape[2]
    num_used = -(-int(context_len) // block_size)
    blocks = cache[block_table[:num_used]]  # [num_used, num_kv_heads, block_size, head_dim]
    tokens = blocks.transpose(0, 2, 1, 3).reshape(num_used * block_size, *blocks.shape[1::2])
    return tokens[: int(context_len)]


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, scale=None) -> np.ndarray:
    """One decode query per sequence attending its whole paged context, in float64.

    Args:
        q: [batch, num_qo_heads, head_dim]
        k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim]
        block_tables: [batch, max_blocks]; context_lens: [batch]
    Returns:
        [batch, num_qo_heads, head_dim] float64.
    """
    q = _f64(q)
    block_tables, context_lens = to_numpy(block_tables), to_numpy(context_lens)
    out = np.empty(q.shape, dtype=np.float64)
    for i in range(q.shape[0]):
        k = paged_gather(k_cache, block_tables[i], context_lens[i])
        v = paged_gather(v_cache, block_tables[i], context_lens[i])
        out[i] = dense_attention(q[i : i + 1], k, v, scale=scale)[0]
    return out
