"""CUDA-graph replay of one step's forward and sampling: one graph per padded row count, static inputs.

A forward launches ~15 kernels per layer from Python; replaying a captured graph issues them all with one
launch. The model runner uses two sets of graphs:

    decode   one row per running sequence                  buckets 1, 2, 4, 8, 16, 24, ... max_num_seqs
    prefill  one row per new token: prompt chunks and the   buckets 64, 128, ..., 1024 tokens; logits only
             step's decode rows (causal attention is        for the rows that sample (logit_rows, at most
             decode attention over each token's prefix)     PREFILL_LOGIT_ROWS; a step with more runs eagerly)

What one replay does (``forward(rows, out)`` of the model runner, captured once per bucket)::

    token_ids[i] = sampled[src_rows[i]] where src_rows[i] >= 0      tokens of the step still running before
    logits       = model.decode(static inputs[:bucket])             write K/V, attention, LM head
    out          = sample(logits, static sampling tensors)          device sampler: greedy rows are argmax

Inputs live in one static device buffer (:class:`~pagedkv.engine.runner.step_inputs.StepInputs`) that every replay
reads and that one host→device copy refills before each replay; the sampled tokens land in the runner's
device buffer ``sampled`` (read back by one device→host copy, and read by the next step's first kernel).

NOTE: capture allocates from a private memory pool (warmed by an eager run of the same shapes just before,
so capture itself needs no cudaMalloc). The eager warm-up samples into a scratch buffer, so capturing a new
bucket in the middle of a run leaves the tokens of the step before intact. Graphs of different sizes share
the pool's temporaries: they never run concurrently and each graph's logits are consumed (extra samples,
logprobs: enqueued right after the replay) before the next replay.
"""
from __future__ import annotations

DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
PREFILL_BUCKETS = tuple(range(64, 1025, 64))
PREFILL_LOGIT_ROWS = 16  # sequences per captured prefill; a chunk with more runs eagerly


class CudaGraphs:
    """Captures ``forward(rows, out) -> logits`` lazily per bucket and replays it on the current stream.

    Args:
        forward: runs the step on the first ``rows`` rows of the static inputs and samples into ``out``.
        out_rows: ``rows -> the sampled-token slice`` a replay writes (the real buffer; warm-ups use a scratch).
        max_rows: the most rows a replay takes; buckets above it are dropped and ``max_rows`` is added.
    """

    def __init__(self, forward, out_rows, max_rows: int, buckets=DECODE_BUCKETS):
        import cupy as cp

        self.cp, self.forward, self.out_rows = cp, forward, out_rows
        self.buckets = [b for b in buckets if b < max_rows] + [max_rows]
        self.max_rows = max_rows
        self.pool = cp.cuda.MemoryPool()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graphs: dict[int, tuple] = {}

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def replay(self, bucket: int):
        """Launch the graph of ``bucket`` (captured now if new); returns its logits (a view of the graph's output
        buffer, valid until the next replay)."""
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, logits = self.graphs[bucket]
        graph.launch(self.cp.cuda.get_current_stream())
        return logits

    def capture_all(self) -> None:
        """Capture every bucket now (the static inputs must be all padding: nothing is written to the cache)."""
        for bucket in self.buckets:
            if bucket not in self.graphs:
                self.graphs[bucket] = self._capture(bucket)
        self.cp.cuda.get_current_stream().synchronize()

    def _capture(self, bucket: int):
        cp = self.cp
        out = self.out_rows(bucket)
        scratch = cp.empty_like(out)
        cp.cuda.get_current_stream().synchronize()
        with cp.cuda.using_allocator(self.pool.malloc), self.stream:
            self.forward(bucket, scratch)  # warm-up: compiles kernels, fills the private pool
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                logits = self.forward(bucket, out)
            finally:
                graph = self.stream.end_capture()
        self.stream.synchronize()
        return graph, logits
