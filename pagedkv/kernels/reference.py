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

from ..backend import to_numpy


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


def prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, *, scale=None) -> np.ndarray:
    """Causal prefill over paged K/V, in float64: each sequence's new tokens attend its cached prefix and
    themselves.

    Sequence ``i`` owns q rows ``qsl[i] .. qsl[i+1]-1`` (``n_i`` new tokens); ``context_lens[i]`` counts its
    tokens in the cache, the new ones included, so new token ``j`` sits at position
    ``context_lens[i] - n_i + j`` and attends keys ``0 ..`` that position::

        keys      0 1 2 3 4 5 6        context_lens[i] = 7, n_i = 3 (4 cached)
        token 0   x x x x x . .        position 4
        token 1   x x x x x x .        position 5
        token 2   x x x x x x x        position 6

    Args:
        q: [num_tokens, num_qo_heads, head_dim]
        k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim]
        block_tables: [num_seqs, max_blocks]; query_start_loc: [num_seqs + 1]; context_lens: [num_seqs]
    Returns:
        [num_tokens, num_qo_heads, head_dim] float64; rows no sequence owns are 0.
    """
    q = _f64(q)
    block_tables, starts, lens = (np.asarray(to_numpy(a), dtype=np.int64)
                                  for a in (block_tables, query_start_loc, context_lens))
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    out = np.zeros(q.shape, dtype=np.float64)
    for i in range(len(lens)):
        a, b = int(starts[i]), int(starts[i + 1])
        if b <= a:
            continue  # a padding sequence
        k = paged_gather(k_cache, block_tables[i], lens[i]).astype(np.float64)
        v = paged_gather(v_cache, block_tables[i], lens[i]).astype(np.float64)
        out[a:b] = _causal_chunks(q[a:b], k, v, scale)
    return out


_CHUNK_ELEMS = 1 << 22  # float64 scores per query chunk of the prefill reference (32 MB)


def _causal_chunks(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Causal attention of the last ``len(q)`` positions of ``k``/``v``, a chunk of queries at a time, each
    chunk against only the keys it can see (batched matrix products per KV head; GQA heads grouped).

    q: [n, num_qo_heads, d]; k, v: [ctx, num_kv_heads, d] float64. Returns [n, num_qo_heads, d].
    """
    n, num_qo_heads, d = q.shape
    ctx, num_kv_heads, _ = k.shape
    group, cached = num_qo_heads // num_kv_heads, ctx - n
    kt, vt = k.transpose(1, 2, 0), v.transpose(1, 0, 2)  # [kv_heads, d, ctx], [kv_heads, ctx, d]
    out = np.empty((n, num_qo_heads, d))
    chunk = max(1, _CHUNK_ELEMS // max(1, num_qo_heads * ctx))
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        end = cached + c1  # keys 0 .. end - 1 are visible to some query of the chunk
        qh = q[c0:c1].reshape(c1 - c0, num_kv_heads, group, d).transpose(1, 2, 0, 3)  # [kv, g, rows, d]
        s = (qh @ kt[:, None, :, :end]) * scale  # [kv, g, rows, end]
        allowed = np.arange(end)[None, :] <= (cached + np.arange(c0, c1))[:, None]
        s = np.where(allowed, s, -np.inf)
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        o = p @ vt[:, None, :end]  # [kv, g, rows, d]
        out[c0:c1] = o.transpose(2, 0, 1, 3).reshape(c1 - c0, num_qo_heads, d)
    return out


def log_softmax(logits) -> np.ndarray:
    """float64 log-probabilities of a ``[vocab]`` (or ``[rows, vocab]``) array: the oracle of the sampler's
    ``logprobs`` (the model's distribution before temperature and filters)."""
    z = _f64(logits)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
