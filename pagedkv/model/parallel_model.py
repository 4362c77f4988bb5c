"""A tensor-parallel model in one process: ``tp_size`` rank models over a :class:`ThreadWorld`, and the KV pools
of their heads behind one cache object — what the engine drives when ``tensor_parallel_size > 1`` on the CPU.

The engine, its scheduler and its block manager see one model and one pool: the same block ids address every
rank's pool (only the head axis is split), so a copy-on-write copy or a cached-block copy is made on every rank,
and each forward runs every rank's slice in its own thread, meeting at the collectives::

    engine ──► ParallelModel.decode(batch, cache)
                 ├─ rank 0: LlamaModel(slice 0).decode(batch, cache.ranks[0])  ─┐ all-reduce, all-gather
                 └─ rank 1: LlamaModel(slice 1).decode(batch, cache.ranks[1])  ─┘ (ThreadWorld: sums)
               ◄── rank 0's logits (every rank holds the same gathered logits)

A rank that raises breaks the world: the forward raises that error in the engine's thread (the engine then
aborts the step's requests and frees their blocks) and no rank is left waiting.
"""
from __future__ import annotations

from ..cache.kv_cache import KVCache
from .config import ModelConfig
from .llama import LlamaModel
from .tensor_parallel import TensorParallelPlan, ThreadWorld, run_ranks, shard_weights
from .weights import ModelWeights


class ShardedKVCache:
    """One K/V pool per rank (each with the rank's KV heads), the same ``num_blocks`` and block ids on every
    rank. Block-level operations (``copy_blocks``) apply to every rank; ``ranks[r]`` is rank r's
    :class:`~pagedkv.cache.kv_cache.KVCache`."""

    def __init__(self, ranks: list[KVCache]):
        if not ranks or len({(c.num_blocks, c.block_size, c.num_layers, c.dtype) for c in ranks}) != 1:
            raise ValueError("every rank's pool must have the same blocks, block size, layers and dtype")
        self.ranks = ranks
        first = ranks[0]
        self.num_layers, self.num_blocks, self.block_size = first.num_layers, first.num_blocks, first.block_size
        self.head_dim, self.dtype, self.backend, self.xp = first.head_dim, first.dtype, first.backend, first.xp
        self.num_kv_heads = sum(c.num_kv_heads for c in ranks)  # NOTE: replicated heads counted per rank

    @property
    def bytes_per_block(self) -> int:
        return sum(c.bytes_per_block for c in self.ranks)

    @property
    def total_bytes(self) -> int:
        return sum(c.total_bytes for c in self.ranks)

    def copy_blocks(self, src_block_ids, dst_block_ids) -> None:
        for cache in self.ranks:
            cache.copy_blocks(src_block_ids, dst_block_ids)


class ParallelModel:
    """``tp_size`` :class:`LlamaModel` ranks, each on its slice of ``weights``, run in lock step by threads.

    The same ``prefill`` / ``decode`` interface as one :class:`LlamaModel` (``kv_cache`` a
    :class:`ShardedKVCache`); ``config`` and ``weights`` are the whole model's."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, backend, tp_size: int, **model_options):
        self.config, self.weights, self.backend, self.xp, self.tp_size = config, weights, backend, backend.xp, tp_size
        self.plans = [TensorParallelPlan(config, tp_size, rank) for rank in range(tp_size)]
        self.world = ThreadWorld(tp_size)
        self.ranks = [LlamaModel(plan.local_config(), shard_weights(weights, plan, backend.xp), backend,
                                 parallel=plan, collective=self.world.group(plan.rank), **model_options)
                      for plan in self.plans]
        first = self.ranks[0]
        self.dtype, self.fused_error, self.gemm_error = first.dtype, first.fused_error, first.gemm_error

    def make_kv_cache(self, num_blocks: int, block_size: int, dtype, device, first: KVCache | None = None
                      ) -> ShardedKVCache:
        """Each rank's pool of ``num_blocks`` blocks over its own KV heads (``first``: rank 0's, made already)."""
        return ShardedKVCache([first if first is not None and p.rank == 0 else
                               KVCache(p.config.num_layers, num_blocks, block_size, p.num_kv_heads,
                                       p.config.head_dim, dtype, device) for p in self.plans])

    def _run(self, method: str, batch, kv_cache: ShardedKVCache):
        out = run_ranks(self.world, lambda r: getattr(self.ranks[r], method)(batch, kv_cache.ranks[r]))
        return out[0]

    def prefill(self, batch, kv_cache):
        return self._run("prefill", batch, kv_cache)

    def decode(self, batch, kv_cache):
        return self._run("decode", batch, kv_cache)


__all__ = ["ParallelModel", "ShardedKVCache"]
