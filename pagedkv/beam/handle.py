"""EngineHandle: everything the beam search uses of an engine, and nothing else.

The search runs beside the request loop, not through it (the engine must be idle): it allocates through the
engine's manager, prefills through its model and decodes through its runner's (graph-captured) decode path.
Those are the only doors it takes; :meth:`EngineHandle.of` reads them from an ``LLMEngine`` once::

    manager         PagedAttentionManager: add / fork / append / free sequences, block tables, slots, lookups
    model, kv_cache model.prefill(PrefillBatch, kv_cache) -> logits [rows, vocab]; model.xp
    decode_logits   runner.decode_logits(tokens [B], lens [B], tables [B, W], slots [B]) -> logits [B, vocab]
    limits          max_num_seqs (rows of one decode), max_num_batched_tokens (tokens of one prefill)
    requests        check_request(prompt, params) (the engine's own rules), is_busy() (requests or sequences
                    live), eos_token_ids, vocab_size
    hasher          the engine's prefix-cache hasher (so that both name the same blocks alike), or None
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..cache.block_hash import BlockHasher
from ..cache.manager import PagedAttentionManager


@dataclass(frozen=True, slots=True)
class EngineHandle:
    manager: PagedAttentionManager
    model: Any
    kv_cache: Any
    runner_decode: Callable
    max_num_seqs: int
    max_num_batched_tokens: int
    check_request: Callable
    is_busy: Callable[[], bool]
    eos_token_ids: frozenset
    vocab_size: int
    hasher: BlockHasher | None

    @classmethod
    def of(cls, engine) -> EngineHandle:
        """The handle of an ``LLMEngine`` (an ``EngineHandle`` is returned as it is)."""
        if isinstance(engine, EngineHandle):
            return engine
        m = engine.manager
        return cls(manager=m, model=engine.model, kv_cache=engine.kv_cache, runner_decode=engine.runner.decode_logits,
                   max_num_seqs=engine.config.max_num_seqs,
                   max_num_batched_tokens=engine.config.max_num_batched_tokens,
                   check_request=engine.check_request,
                   is_busy=lambda: engine.has_unfinished_requests() or bool(m.seq_ids),
                   eos_token_ids=frozenset(engine.eos_token_ids), vocab_size=engine.model_config.vocab_size,
                   hasher=_hasher(engine))

    def decode_logits(self, tokens, lens, tables, slots):
        """One decode forward: the runner's captured CUDA graph when it has one (GPU, ``cuda_graph=True``), else
        eager ``model.decode``. Returns logits [rows, vocab] on the device (valid until the next forward)."""
        return self.runner_decode(np.asarray(tokens), np.asarray(lens), np.asarray(tables), np.asarray(slots))


def _hasher(engine) -> BlockHasher | None:
    """The engine's block hasher when its manager caches prefixes (its prefix cache's), else None."""
    if not engine.manager.enable_prefix_caching:
        return None
    cache = getattr(engine.scheduler, "prefix_cache", None)
    if cache is not None:
        return cache.hasher
    return BlockHasher.for_model(repr(engine.model_config), str(engine.kv_cache.dtype), engine.manager.block_size)
