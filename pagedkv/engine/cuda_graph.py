"""CUDA-graph replay of the model's paged forward: one graph per padded row count, static input buffers.

A forward launches ~15 kernels per layer from Python; replaying a captured graph issues them all with one
launch. The same runner serves two uses:

    decode   one row per running sequence                  buckets 1, 2, 4, 8, 16, 24, ... max_num_seqs
    prefill  one row per new token: prompt chunks and the   buckets 64, 128, ..., 1024 tokens; logits only
             step's decode rows (causal attention is        for the rows that sample (logit_rows, at most
             decode attention over each token's prefix)     PREFILL_LOGIT_ROWS; a step with more runs eagerly)

Inputs live in static device buffers that every replay reads::

    token_ids, positions, context_lens : int32 [max_rows]        block_tables : int32 [max_rows, max_blocks]
    slot_mapping                       : int64 [max_rows]        logit_rows   : int64 [num_logit_rows]
    rows >= the real count (padding): slot -1 (no write), context_len 1, block 0 (read, discarded)

NOTE: capture allocates from a private memory pool (warmed by an eager run of the same shapes just before,
so capture itself needs no cudaMalloc). Graphs of different sizes share that pool's temporaries: they never
run concurrently and each graph's logits are consumed before the next replay.
"""
from __future__ import annotations

import numpy as np

from ..model import DecodeBatch

DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
PREFILL_BUCKETS = tuple(range(64, 1025, 64))
PREFILL_LOGIT_ROWS = 16  # sequences per captured prefill; a chunk with more runs eagerly


class DecodeGraphs:
    """Captures ``model.decode`` lazily per bucket and replays it on the current stream.

    Args:
        max_rows: the most rows a replay takes (max_num_seqs for decode, tokens for prefill).
        buckets: row counts to capture (those above ``max_rows`` are dropped, ``max_rows`` is added).
        num_logit_rows: 0 for logits of every row (decode); else the size of the ``logit_rows`` buffer.
    """

    def __init__(self, model, kv_cache, max_rows: int, max_blocks: int, buckets=DECODE_BUCKETS,
                 num_logit_rows: int = 0):
        import cupy as cp

        self.cp, self.model, self.kv_cache = cp, model, kv_cache
        self.buckets = [b for b in buckets if b < max_rows] + [max_rows]
        self.max_rows, self.max_blocks, self.num_logit_rows = max_rows, max_blocks, num_logit_rows
        self.ints = cp.zeros(3 * max_rows + max_rows * max_blocks, dtype=cp.int32)
        self.slots = cp.full(max_rows, -1, dtype=cp.int64)
        self.logit_rows = cp.zeros(max(num_logit_rows, 1), dtype=cp.int64)
        self.pool = cp.cuda.MemoryPool()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graphs: dict[int, tuple] = {}

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def fits(self, rows: int, num_sequences: int = 0) -> bool:
        return rows <= self.max_rows and num_sequences <= self.num_logit_rows

    def _views(self, bucket: int) -> DecodeBatch:
        n, m, ints = self.max_rows, self.max_blocks, self.ints
        return DecodeBatch(token_ids=ints[:bucket], positions=ints[n:n + bucket], slot_mapping=self.slots[:bucket],
                           context_lens=ints[2 * n:2 * n + bucket],
                           block_tables=ints[3 * n:].reshape(n, m)[:bucket],
                           logit_rows=self.logit_rows if self.num_logit_rows else None)

    def _fill(self, tokens, lens, tables, slots, logit_rows=None) -> None:
        """One host→device copy of the int32 metadata (padding rows set), one of the slots (and logit rows)."""
        n, m, rows = self.max_rows, self.max_blocks, len(tokens)
        host = np.zeros(3 * n + n * m, dtype=np.int32)
        host[2 * n:3 * n] = 1  # padding rows: context_len 1
        host[:rows], host[n:n + rows], host[2 * n:2 * n + rows] = tokens, lens - 1, lens
        host[3 * n:].reshape(n, m)[:rows, :tables.shape[1]] = tables
        host_slots = np.full(n, -1, dtype=np.int64)
        host_slots[:rows] = slots
        self.ints.set(host)
        self.slots.set(host_slots)
        if logit_rows is not None:
            host_rows = np.zeros(self.num_logit_rows, dtype=np.int64)
            host_rows[:len(logit_rows)] = logit_rows
            self.logit_rows.set(host_rows)

    def run(self, tokens, lens, tables, slots, logit_rows=None):
        """Logits of one replay: [rows, vocab] (decode) or [len(logit_rows), vocab], a view into the graph's
        output buffer. ``lens`` = positions + 1 per row."""
        if tables.shape[1] > self.max_blocks:
            raise ValueError(f"block table of {tables.shape[1]} blocks exceeds max_blocks={self.max_blocks}")
        if not self.fits(len(tokens), 0 if logit_rows is None else len(logit_rows)):
            raise ValueError(f"{len(tokens)} rows / {len(logit_rows)} logit rows exceed this runner's buffers")
        self._fill(tokens, lens, tables, slots, logit_rows)
        bucket = self.bucket(len(tokens))
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, logits = self.graphs[bucket]
        graph.launch(self.cp.cuda.get_current_stream())
        return logits[:len(tokens) if logit_rows is None else len(logit_rows)]

    def capture_all(self) -> None:
        """Capture every bucket ahead of time on an all-padding batch (no cache writes; outputs discarded)."""
        empty = np.zeros(0, dtype=np.int32)
        self._fill(empty, empty, np.zeros((0, 1), dtype=np.int32), empty.astype(np.int64),
                   empty.astype(np.int64) if self.num_logit_rows else None)
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
