"""The model runner: one scheduled step in, one forward and the sampled tokens out.

    SchedulerOutput ─► batch metadata ─► forward ─► logits of the rows that want them ─► samples
                       (host arrays)      decode-only step: ``model.decode`` (a CUDA graph per batch bucket)
                                          otherwise: ``model.prefill`` over every sequence's new tokens, decode
                                          rows included (a CUDA graph per token bucket where it fits)

Rows that want logits: the last token of every sequence that samples (a decode, or a prompt's last chunk),
and, for requests asking for ``prompt_logprobs``, every prompt token whose successor is a prompt token.
The runner reads the scheduler's work and returns values; it changes no request.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..backend import to_numpy
from ..model import DecodeBatch, PrefillBatch
from .logprobs import token_logprobs
from .metrics import StepTiming
from .sampling import sample
from .step_plan import ScheduledSeq, SchedulerOutput


@dataclass(slots=True)
class StepResult:
    """``sampled[i][j]``: the token of ``seqs[i].sample_branches[j]``; ``logprobs[i][j]``: its ``(entries,
    logprob)`` when the params ask for logprobs (``logprobs[i]`` None when none of them does);
    ``prompt_logprobs``: ``(request, position, entries)`` for prompt tokens."""

    sampled: list[list[int]] = field(default_factory=list)
    logprobs: list[list | None] = field(default_factory=list)
    prompt_logprobs: list[tuple] = field(default_factory=list)


class ModelRunner:
    """Runs scheduled steps of ``model`` on ``kv_cache`` (sequences and block tables from ``manager``).

    Args:
        max_num_seqs, max_num_batched_tokens, max_model_len: the engine's limits (CUDA-graph buffer sizes).
        cuda_graph: replay decode (and small prefill) forwards as CUDA graphs on a GPU.
    """

    def __init__(self, model, kv_cache, manager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, cuda_graph: bool):
        self.model, self.kv_cache, self.manager = model, kv_cache, manager
        self.backend, self.block_size = model.backend, manager.block_size
        self.last_timing = StepTiming()
        self.graphs = self.prefill_graphs = self.graph_error = None
        if cuda_graph and self.backend.is_gpu:
            from .cuda_graph import PREFILL_BUCKETS, PREFILL_LOGIT_ROWS, DecodeGraphs

            max_blocks = -(-max_model_len // self.block_size)
            self.graphs = DecodeGraphs(model, kv_cache, max_num_seqs, max_blocks)
            self.prefill_graphs = DecodeGraphs(model, kv_cache, min(PREFILL_BUCKETS[-1], max_num_batched_tokens),
                                               max_blocks, PREFILL_BUCKETS, PREFILL_LOGIT_ROWS)

    # -------------------------------------------------------------------------------------------- step
    def execute(self, out: SchedulerOutput) -> StepResult:
        """One forward over every scheduled sequence, then sampling. Raises whatever the forward raises."""
        timing = self.last_timing = StepTiming()
        if not out.seqs:
            return StepResult()
        t0 = time.perf_counter()
        if all(s.num_tokens == 1 and s.sample_branches for s in out.seqs) and not self._wants_prompt_logprobs(out):
            logits, rows = self._decode(out.seqs, timing)
            prompt_rows = []
        else:
            logits, rows, prompt_rows = self._prefill(out.seqs)
            timing.prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        result = self._sample(logits, out.seqs, rows, prompt_rows)
        timing.decode_sync_sample_s = time.perf_counter() - t1
        return result

    @staticmethod
    def _wants_prompt_logprobs(out: SchedulerOutput) -> bool:
        return any(s.request.params.prompt_logprobs is not None and s.start < s.request.prompt_len - 1
                   for s in out.seqs)

    def _decode(self, seqs: list[ScheduledSeq], timing: StepTiming):
        """A decode-only step: one row per sequence; logits [B, vocab], row ``i`` for ``seqs[i]``."""
        t0 = time.perf_counter()
        seq_ids = [s.branch.seq_id for s in seqs]
        tokens = np.array([s.request.token_slice(s.branch, s.start, s.end)[0] for s in seqs], dtype=np.int32)
        positions = np.array([s.start for s in seqs], dtype=np.int32)
        tables = self.manager.block_tables(seq_ids)
        bs = self.block_size
        slots = tables[np.arange(len(seq_ids)), positions // bs].astype(np.int64) * bs + positions % bs
        lens = positions + 1
        t1 = time.perf_counter()
        logits = self._decode_graph(tokens, lens, tables, slots) if self.graphs is not None else None
        if logits is None:
            logits = self.model.decode(self.decode_batch(tokens, lens, tables, slots), self.kv_cache)
        timing.decode_prepare_s, timing.decode_issue_s = t1 - t0, time.perf_counter() - t1
        return logits, list(range(len(seqs)))

    def _prefill(self, seqs: list[ScheduledSeq]):
        """Every sequence's new tokens in one forward; returns (logits, logits row of each sampling sequence
        (or -1), [(logits row, request, prompt position)] for prompt logprobs)."""
        batch_rows, sample_rows, prompt_rows, offset = [], [], [], 0
        for s in seqs:
            for p in self._prompt_logprob_positions(s):
                prompt_rows.append((len(batch_rows), s.request, p + 1))
                batch_rows.append(offset + p - s.start)
            sample_rows.append(len(batch_rows) if s.sample_branches else -1)
            if s.sample_branches:
                batch_rows.append(offset + s.num_tokens - 1)
            offset += s.num_tokens
        if not batch_rows:  # NOTE: no row samples (mid-prompt chunks only): one row anyway, never an empty product
            batch_rows.append(offset - 1)
        batch = PrefillBatch(
            token_ids=np.concatenate([np.asarray(s.token_ids(), dtype=np.int64) for s in seqs]),
            positions=np.concatenate([np.arange(s.start, s.end, dtype=np.int64) for s in seqs]),
            slot_mapping=np.concatenate([self.manager.slots(s.branch.seq_id, s.start, s.end) for s in seqs]),
            seq_lens=[s.num_tokens for s in seqs], num_cached=[s.start for s in seqs],
            block_tables=[self.manager.block_table(s.branch.seq_id) for s in seqs],
            logit_rows=np.asarray(batch_rows, dtype=np.int64))
        logits = self._prefill_graph(batch) if self.prefill_graphs is not None else None
        if logits is None:
            logits = self.model.prefill(batch, self.kv_cache)
        return logits, sample_rows, prompt_rows

    @staticmethod
    def _prompt_logprob_positions(s: ScheduledSeq) -> range:
        """Positions of this chunk whose logits score the next prompt token (not yet scored)."""
        r = s.request
        if r.params.prompt_logprobs is None or r.prompt_logprobs is None:
            return range(0)
        first = max(s.start, len(r.prompt_logprobs) - 1)
        return range(first, min(s.end, r.prompt_len - 1))

    # --------------------------------------------------------------------------------------- graphs
    def _decode_graph(self, tokens, lens, tables, slots):
        try:
            return self.graphs.run(tokens, lens, tables, slots)
        except Exception as exc:  # NOTE: capture can fail on some stacks; fall back to eager launches
            self._drop_graphs(exc)
            return None

    def _prefill_graph(self, batch: PrefillBatch):
        """A prefill (or mixed) step replayed as one graph (rows = tokens), or None when it does not fit."""
        g = self.prefill_graphs
        tables = batch.token_block_tables()
        rows = batch.rows()
        if not g.fits(len(batch.token_ids), len(rows)) or tables.shape[1] > g.max_blocks:
            return None
        try:
            return g.run(np.asarray(batch.token_ids, dtype=np.int32), np.asarray(batch.positions, dtype=np.int32) + 1,
                         tables, batch.slot_mapping, rows)
        except Exception as exc:  # NOTE: as in _decode_graph
            self._drop_graphs(exc)
            return None

    def _drop_graphs(self, exc: Exception) -> None:
        self.graph_error, self.graphs, self.prefill_graphs = f"{type(exc).__name__}: {exc}", None, None

    def warmup_graphs(self) -> None:
        """Capture the decode and prefill graphs of every bucket now (else lazily, at first use)."""
        try:
            for runner in (self.graphs, self.prefill_graphs):
                if runner is not None:
                    runner.capture_all()
        except Exception as exc:  # NOTE: as in _decode_graph: fall back to eager launches
            self._drop_graphs(exc)

    def decode_batch(self, tokens, lens, tables, slots) -> DecodeBatch:
        """Device metadata of one decode step: int32 token ids, positions, context lengths and block tables
        in one host→device copy, int64 slots in another."""
        xp, num = self.backend.xp, len(tokens)
        packed = xp.asarray(np.concatenate([tokens, lens - 1, lens, tables.ravel()]).astype(np.int32))
        return DecodeBatch(token_ids=packed[:num], positions=packed[num:2 * num], slot_mapping=xp.asarray(slots),
                           context_lens=packed[2 * num:3 * num], block_tables=packed[3 * num:].reshape(tables.shape))

    # -------------------------------------------------------------------------------------- sampling
    def _sample(self, logits, seqs: list[ScheduledSeq], rows: list[int], prompt_rows: list) -> StepResult:
        """Greedy rows: argmax on the device; others (and logprobs): their logits to the host."""
        xp = self.backend.xp
        greedy = to_numpy(xp.argmax(logits, axis=-1)).tolist() if len(rows) else []
        wanted = sorted({rows[i] for i, s in enumerate(seqs) if s.sample_branches and _needs_host(s)} |
                        {row for row, _, _ in prompt_rows})
        host = {}
        if wanted:
            host = dict(zip(wanted, to_numpy(logits[xp.asarray(np.array(wanted))].astype(np.float32))))
        result = StepResult()
        for s, row in zip(seqs, rows):
            params = s.request.params
            if params.greedy:
                tokens = [greedy[row]] * len(s.sample_branches)
            else:
                tokens = [sample(host[row], params, b.rng) for b in s.sample_branches]
            result.sampled.append(tokens)
            result.logprobs.append(None if params.logprobs is None else
                                   [token_logprobs(host[row], t, params.logprobs) for t in tokens])
        for row, request, position in prompt_rows:
            num_top = request.params.prompt_logprobs
            entries, _ = token_logprobs(host[row], request.prompt_token_ids[position], num_top)
            result.prompt_logprobs.append((request, position, entries))
        return result


def _needs_host(s: ScheduledSeq) -> bool:
    return not s.request.params.greedy or s.request.params.logprobs is not None
