"""Log-probabilities on the host: the sampled (or given) token's and the top ``k``, from raw logits.

They describe the model's distribution before temperature and filters (as vLLM's default ``raw_logprobs``).
NOTE: the engine computes logprobs with ``pagedkv.engine.sampler.logprobs`` (device or NumPy, see
``pagedkv.engine.logprob_rows``); this float64 version is the tests' reference.
"""
from __future__ import annotations

import numpy as np


def log_softmax(logits) -> np.ndarray:
    """float64 log-probabilities of a ``[vocab]`` (or ``[rows, vocab]``) host array."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_logprobs(logits, token_id: int, num_top: int) -> tuple[dict[int, float], float]:
    """``({token_id: lp, top ids: lp...}, lp of token_id)`` for one ``[vocab]`` row; ``num_top`` may be 0.

    The dict lists the top ``num_top`` ids from the most likely down, then ``token_id`` if it is not among them.
    """
    lp = log_softmax(logits)
    chosen = float(lp[token_id])
    entries: dict[int, float] = {}
    if num_top:
        top = np.argpartition(-lp, num_top - 1)[:num_top] if num_top < lp.size else np.arange(lp.size)
        for i in top[np.argsort(-lp[top], kind="stable")]:
            entries[int(i)] = float(lp[i])
    entries.setdefault(int(token_id), chosen)
    return entries, chosen
