"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeded per request."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class SamplingParams:
    """How one request is decoded (vLLM's names and meaning).

    ``temperature == 0`` is greedy. ``top_k <= 0`` and ``top_p == 1`` disable those filters. ``n`` branches
    share the prompt's KV blocks (``fork_sequence``). ``seed`` makes sampling reproducible per request.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an int (<= 0 disables it), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {self.seed!r}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rngs(self) -> list[np.random.Generator]:
        """One generator per branch: reproducible for a given seed, independent across branches."""
        children = np.random.SeedSequence(self.seed).spawn(self.n)
        return [np.random.default_rng(s) for s in children]


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Sampling distribution over the vocabulary after temperature, top-k and top-p (float64 [vocab])."""
    z = np.asarray(logits, dtype=np.float64) / params.temperature
    if 0 < params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, params.top_p)) + 1]  # smallest prefix with mass >= top_p
        mask = np.zeros_like(p)
        mask[keep] = 1
        p = p * mask
        p /= p.sum()
    return p


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from ``logits`` [vocab] (host float array); greedy draws no random number."""
    if params.greedy:
        return int(np.argmax(logits))
    p = probabilities(logits, params)
    return int(min(np.searchsorted(np.cumsum(p), rng.random(), side="right"), p.size - 1))
