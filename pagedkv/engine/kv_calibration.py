"""fp8 KV scales from data (``EngineConfig(calculate_kv_scales=True)``, vLLM's option): before the first step,
the first prompts run through the model once on a scratch cache in the model's dtype; per layer

    k_scale = amax |K| / FP8_MAX      v_scale = amax |V| / FP8_MAX      (1.0 for an all-zero layer)

so the largest K and V of those prompts land on the format's largest finite value. The scales are set before
any CUDA graph is captured (graphs captured earlier, by ``warmup_graphs``, are dropped: their launches carry
the old scales as arguments). The scratch forward writes nothing to the engine's cache.
"""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from ..fp8 import calibrated_scale
from ..cache.kv_cache import KVCache
from ..model.llama import PrefillBatch


def calibration_prompts(prompts, max_tokens: int) -> list[list[int]]:
    """The first prompts whose lengths sum to at most ``max_tokens`` (the first one cut to it if longer)."""
    chosen, total = [], 0
    for ids in prompts:
        ids = list(ids)[: max_tokens - total]
        if not ids:
            break
        chosen.append(ids)
        total += len(ids)
    return chosen


def measure_kv_amax(model, kv_cache: KVCache, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer ``max |K|`` and ``max |V|`` (float64 ``[num_layers]``) of ``prompts`` run as one prefill."""
    bs = kv_cache.block_size
    blocks = [-(-len(p) // bs) for p in prompts]
    scratch = KVCache(kv_cache.num_layers, max(1, sum(blocks)), bs, kv_cache.num_kv_heads, kv_cache.head_dim,
                      kv_cache.dtype, kv_cache.backend.name)
    scratch.k_pool[...] = 0  # NOTE: the unused tail slots must not count
    scratch.v_pool[...] = 0
    tables, slots, first = [], [], 0
    for p, n in zip(prompts, blocks):
        tables.append(list(range(first, first + n)))
        slots.append(np.arange(len(p), dtype=np.int64) + first * bs)
        first += n
    batch = PrefillBatch(token_ids=np.concatenate([np.asarray(p, np.int64) for p in prompts]),
                         positions=np.concatenate([np.arange(len(p), dtype=np.int64) for p in prompts]),
                         slot_mapping=np.concatenate(slots), seq_lens=[len(p) for p in prompts],
                         num_cached=[0] * len(prompts), block_tables=tables)
    model.prefill(batch, scratch)
    xp = scratch.xp
    amax = [to_numpy(xp.abs(pool.reshape(pool.shape[0], -1)).max(axis=1)).astype(np.float64)
            for pool in (scratch.k_pool, scratch.v_pool)]
    return amax[0], amax[1]


def calibrate_kv_scales(model, kv_cache: KVCache, prompts, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Set ``kv_cache``'s scales from ``prompts`` (see the module docstring); returns ``(k_scales, v_scales)``."""
    chosen = calibration_prompts(prompts, max_tokens)
    if not chosen:
        return kv_cache.k_scales, kv_cache.v_scales
    k_amax, v_amax = measure_kv_amax(model, kv_cache, chosen)
    k = [calibrated_scale(a, kv_cache.kv_dtype) for a in k_amax]
    v = [calibrated_scale(a, kv_cache.kv_dtype) for a in v_amax]
    kv_cache.set_scales(k, v)
    return kv_cache.k_scales, kv_cache.v_scales
