"""CUDA-graph replay of the decode forward: one graph per padded batch size, static input buffers.

A decode step launches ~15 kernels per layer from Python; replaying a captured graph issues them all with
one launch. Inputs live in static device buffers that every replay reads::

    token_ids, positions, context_lens : int32 [max_batch]        block_tables : int32 [max_batch, max_blocks]
    slot_mapping                       : int64 [max_batch]
    rows >= batch (padding): slot -1 (no write), context_len 1, block 0 (read, discarded)

NOTE: capture allocates from a private memory pool (warmed by an eager run of the same shapes just before,
so capture itself needs no cudaMalloc). Graphs of different sizes share that pool's temporaries: they never
run concurrently and each graph's logits are consumed before the next replay.
"""
from __future__ import annotations

import numpy as np

from ..model import DecodeBatch

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class DecodeGraphs:
    """Captures ``model.decode`` lazily per bucket and replays it on the current stream."""

    def __init__(self, model, kv_cache, max_batch: int, max_blocks: int):
        import cupy as cp

        self.cp, self.model, self.kv_cache = cp, model, kv_cache
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_blocks = max_blocks
        self.ints = cp.zeros(3 * max_batch + max_batch * max_blocks, dtype=cp.int32)
        self.slots = cp.full(max_batch, -1, dtype=cp.int64)
        self.pool = cp.cuda.MemoryPool()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graphs: dict[int, tuple] = {}

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def _views(self, bucket: int) -> DecodeBatch:
        m = self.max_blocks
        n = len(self.slots)
        ints = self.ints
        return DecodeBatch(token_ids=ints[:bucket], positions=ints[n:n + bucket], slot_mapping=self.slots[:bucket],
                           context_lens=ints[2 * n:2 * n + bucket],
                           block_tables=ints[3 * n:].reshape(n, m)[:bucket])

    def _fill(self, tokens, lens, tables, slots) -> None:
        """One host→device copy of the int32 metadata (padding rows set), one of the slots."""
        n, m, batch = len(self.slots), self.max_blocks, len(tokens)
        host = np.zeros(3 * n + n * m, dtype=np.int32)
        host[2 * n:3 * n] = 1  # padding rows: context_len 1
        host[:batch], host[n:n + batch], host[2 * n:2 * n + batch] = tokens, lens - 1, lens
        host[3 * n:].reshape(n, m)[:batch, :tables.shape[1]] = tables
        host_slots = np.full(n, -1, dtype=np.int64)
        host_slots[:batch] = slots
        self.ints.set(host)
        self.slots.set(host_slots)

    def run(self, tokens, lens, tables, slots):
        """Logits [batch, vocab] of one decode step (a view into the graph's output buffer)."""
        if tables.shape[1] > self.max_blocks:
            raise ValueError(f"block table of {tables.shape[1]} blocks exceeds max_blocks={self.max_blocks}")
        self._fill(tokens, lens, tables, slots)
        bucket = self.bucket(len(tokens))
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, logits = self.graphs[bucket]
        graph.launch(self.cp.cuda.get_current_stream())
        return logits[:len(tokens)]

    def capture_all(self) -> None:
        """Capture every bucket ahead of time on an all-padding batch (no cache writes; outputs discarded)."""
        empty = np.zeros(0, dtype=np.int32)
        self._fill(empty, empty, np.zeros((0, 1), dtype=np.int32), empty.astype(np.int64))
        for bucket in self.buckets:
            if bucket not in self.graphs:
                self.graphs[bucket] = self._capture(bucket)
        self.cp.cuda.get_current_stream().synchronize()

    def _capture(self, bucket: int):
        cp = self.cp
        batch = self._views(bucket)
        cp.cuda.get_current_stream().synchronize()
        with cp.cuda.using_allocator(self.pool.malloc), self.stream:
            self.model.decode(batch, self.kv_cache)  # warm-up: compiles kernels, fills the private pool
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                logits = self.model.decode(batch, self.kv_cache)
            finally:
                graph = self.stream.end_capture()
        self.stream.synchronize()
        return graph, logits
