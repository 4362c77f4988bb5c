"""Building blocks on the array module ``xp`` (NumPy or CuPy): RMSNorm, rotary embeddings, SwiGLU,
causal attention over a gathered context. Statistics and softmax run in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import array_module


def rms_norm(x, weight, eps: float):
    """``weight * (x / sqrt(mean(x^2) + eps))``, the mean in float32 (as Hugging Face's LlamaRMSNorm).

    Args:
        x: [num_tokens, hidden]; weight: [hidden].
    """
    xp = array_module(x)
    x32 = x.astype(np.float32)
    inv = 1.0 / xp.sqrt((x32 * x32).mean(axis=-1, keepdims=True) + np.float32(eps))
    return weight * (x32 * inv).astype(x.dtype)


class Rope:
    """Rotary position embedding tables, ``cos`` / ``sin`` [max_positions, head_dim // 2] float32.

    The half-split ("rotate_half") convention of Llama/Qwen2: dimension ``j`` pairs with ``j + head_dim/2``.
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int, xp=np, llama3_scaling=None):
        inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
        if llama3_scaling is not None:
            inv_freq = llama3_inv_freq(inv_freq, *llama3_scaling)
        freqs = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :].astype(np.float32)
        self.cos, self.sin = xp.asarray(np.cos(freqs)), xp.asarray(np.sin(freqs))
        self.max_positions = max_positions

    def __call__(self, x, positions):
        """Rotate ``x`` [num_tokens, num_heads, head_dim] at ``positions`` [num_tokens] (a new array)."""
        half = x.shape[-1] // 2
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        x32 = x.astype(np.float32)
        x1, x2 = x32[..., :half], x32[..., half:]
        xp = array_module(x)
        return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def llama3_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position):
    """Llama 3.x rotary frequencies: long wavelengths divided by ``factor``, short ones kept, a smooth blend
    between (as Hugging Face's ``rope_type="llama3"``)."""
    low_wavelen = original_max_position / low_freq_factor
    high_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def silu_mul(gate_up):
    """SwiGLU activation: ``silu(gate) * up`` for ``gate_up`` [num_tokens, 2 * intermediate]."""
    xp = array_module(gate_up)
    inter = gate_up.shape[-1] // 2
    gate, up = gate_up[:, :inter].astype(np.float32), gate_up[:, inter:]
    return (gate / (1.0 + xp.exp(-gate))).astype(up.dtype) * up


def causal_attention(q, k, v, scale: float):
    """Causal GQA attention where the queries are the *last* ``num_q`` of ``num_kv`` positions.

    Args:
        q: [num_q, num_heads, head_dim]; k, v: [num_kv, num_kv_heads, head_dim] (same dtype).
    Returns:
        [num_q, num_heads, head_dim], q's dtype. Scores and softmax in float32.
    """
    xp = array_module(q)
    num_q, num_heads, head_dim = q.shape
    num_kv, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    # query row r of kv head g is (query r % num_q, head g * group + r // num_q)
    qh = q.reshape(num_q, num_kv_heads, group, head_dim).transpose(1, 2, 0, 3).reshape(num_kv_heads, -1, head_dim)
    scores = xp.matmul(qh, k.transpose(1, 2, 0)).astype(np.float32) * np.float32(scale)  # [Hkv, g*num_q, num_kv]
    allowed = xp.arange(num_kv)[None, :] <= (xp.arange(num_q)[:, None] + (num_kv - num_q))
    scores = xp.where(xp.tile(allowed, (group, 1))[None], scores, np.float32(-np.inf))
    scores -= scores.max(axis=-1, keepdims=True)
    probs = xp.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = xp.matmul(probs.astype(v.dtype), v.transpose(1, 0, 2))  # [Hkv, g*num_q, head_dim]
    return out.reshape(num_kv_heads, group, num_q, head_dim).transpose(2, 0, 1, 3).reshape(num_q, num_heads, head_dim)


@dataclass(slots=True)
class PaddedGroup:
    """Sequences attended together: token ``rows`` of the concatenated batch land at ``dest`` rows of a
    ``[num_seqs * longest]`` padded layout; ``causal`` is the ``[group * longest, longest]`` mask."""

    rows: object
    dest: object
    num_seqs: int
    longest: int
    causal: object


def varlen_plan(seq_lens, num_heads: int, num_kv_heads: int, xp=np, max_elements: int = 1 << 28) -> list:
    """Group sequences (sorted by length) so each group's scores ``[n, heads, longest, longest]`` stay under
    ``max_elements``; built once per prefill batch and reused by every layer."""
    starts = np.concatenate([[0], np.cumsum(seq_lens)]).astype(np.int64)
    groups, current = [], []
    for i in np.argsort(seq_lens, kind="stable"):
        if current and (len(current) + 1) * int(seq_lens[i]) ** 2 * num_heads > max_elements:
            groups.append(current)
            current = []
        current.append(int(i))
    groups.append(current)
    plan = []
    for g in groups:
        longest = max(int(seq_lens[i]) for i in g)
        rows = np.concatenate([np.arange(starts[i], starts[i] + seq_lens[i]) for i in g])
        dest = np.concatenate([b * longest + np.arange(seq_lens[i]) for b, i in enumerate(g)])
        causal = np.tile(np.tril(np.ones((longest, longest), dtype=bool)), (num_heads // num_kv_heads, 1))
        plan.append(PaddedGroup(xp.asarray(rows), xp.asarray(dest), len(g), longest, xp.asarray(causal)))
    return plan


def varlen_causal_attention(q, k, v, plan: list, scale: float):
    """Causal attention of several sequences concatenated along tokens, in padded batches (few launches).

    A causal mask alone suffices: a real query ``i`` never sees a key past ``i``, so never a padding key.

    Args:
        q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim]; plan: :func:`varlen_plan`.
    Returns:
        [T, num_heads, head_dim], q's dtype.
    """
    out = array_module(q).empty_like(q)
    for group in plan:
        _padded_group(q, k, v, out, group, scale)
    return out


def _padded_group(q, k, v, out, g: PaddedGroup, scale):
    xp = array_module(q)

    def pad(x):
        p = xp.zeros((g.num_seqs * g.longest, *x.shape[1:]), dtype=x.dtype)
        p[g.dest] = x[g.rows]
        return p.reshape(g.num_seqs, g.longest, *x.shape[1:])

    qp, kp, vp = pad(q), pad(k), pad(v)
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    group, b, n = num_heads // num_kv_heads, g.num_seqs, g.longest
    qh = qp.reshape(b, n, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    qh = qh.reshape(b, num_kv_heads, group * n, head_dim)
    scores = xp.matmul(qh, kp.transpose(0, 2, 3, 1)).astype(np.float32) * np.float32(scale)
    scores = xp.where(g.causal, scores, np.float32(-np.inf))
    scores -= scores.max(axis=-1, keepdims=True)
    probs = xp.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    o = xp.matmul(probs.astype(v.dtype), vp.transpose(0, 2, 1, 3))  # [b, Hkv, group * n, head_dim]
    o = o.reshape(b, num_kv_heads, group, n, head_dim).transpose(0, 3, 1, 2, 4)
    out[g.rows] = o.reshape(b * n, num_heads, head_dim)[g.dest]
