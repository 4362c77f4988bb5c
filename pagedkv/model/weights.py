"""Model weights: fused layouts for few, large GEMMs, and random initialisation from a seed.

Every matrix is stored ``[in_features, out_features]`` so a layer is ``x @ w``::

    wqkv       [hidden, (num_heads + 2 * num_kv_heads) * head_dim]    q | k | v, fused
    wo         [num_heads * head_dim, hidden]
    w_gate_up  [hidden, 2 * intermediate]                              gate | up, fused
    w_down     [intermediate, hidden]
    lm_head    [hidden, vocab]   (tied: a transposed view of ``embed`` [vocab, hidden])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import Backend, dtype_of, get_backend
from .config import ModelConfig


@dataclass(slots=True)
class LayerWeights:
    input_norm: Any  # [hidden]
    wqkv: Any  # [hidden, qkv_size]
    bqkv: Any  # [qkv_size] or None
    wo: Any  # [num_heads * head_dim, hidden]
    post_norm: Any  # [hidden]
    w_gate_up: Any  # [hidden, 2 * intermediate]
    w_down: Any  # [intermediate, hidden]


@dataclass(slots=True)
class ModelWeights:
    embed: Any  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: Any  # [hidden]
    lm_head: Any  # [hidden, vocab]
    tied: bool = False  # lm_head is a view of embed

    def num_bytes(self) -> int:
        """Bytes of distinct weight storage (a tied LM head counted once)."""
        arrays = [self.embed, self.final_norm] + [a for lw in self.layers for a in
                                                  (lw.input_norm, lw.wqkv, lw.bqkv, lw.wo, lw.post_norm,
                                                   lw.w_gate_up, lw.w_down) if a is not None]
        total = sum(int(a.nbytes) for a in arrays)
        return total if self.tied else total + int(self.lm_head.nbytes)


class _Normal:
    """Seeded normal draws in float32 on the backend (NumPy ``Generator`` or CuPy ``RandomState``)."""

    def __init__(self, backend: Backend, seed: int):
        self.rng = backend.xp.random.RandomState(seed) if backend.is_gpu else np.random.default_rng(seed)

    def __call__(self, shape, std: float, dtype):
        return (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(dtype)


def random_weights(config: ModelConfig, *, seed: int = 0, dtype="float32", device="auto") -> ModelWeights:
    """Random weights: matrices ~ N(0, 1/fan_in) (activations stay O(1) through depth), embeddings ~ N(0, 1),
    norms 1, biases ~ N(0, 0.1). Reproducible per seed and backend (NumPy and CuPy streams differ)."""
    backend = get_backend(device) if isinstance(device, str) else device
    dt, xp, normal = dtype_of(dtype), backend.xp, _Normal(backend, seed)
    h, i, c = config.hidden_size, config.intermediate_size, config
    ones = lambda: xp.ones(h, dtype=dt)
    layers = [LayerWeights(
        input_norm=ones(), wqkv=normal((h, c.qkv_size), h**-0.5, dt),
        bqkv=normal((c.qkv_size,), 0.1, dt) if c.qkv_bias else None,
        wo=normal((c.num_heads * c.head_dim, h), (c.num_heads * c.head_dim) ** -0.5, dt),
        post_norm=ones(), w_gate_up=normal((h, 2 * i), h**-0.5, dt), w_down=normal((i, h), i**-0.5, dt),
    ) for _ in range(c.num_layers)]
    embed = normal((c.vocab_size, h), 1.0, dt)
    lm_head = embed.T if c.tie_word_embeddings else normal((h, c.vocab_size), h**-0.5, dt)
    return ModelWeights(embed=embed, layers=layers, final_norm=ones(), lm_head=lm_head,
                        tied=c.tie_word_embeddings)
