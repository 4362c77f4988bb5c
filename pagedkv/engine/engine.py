"""LLMEngine: requests in, tokens out — the scheduler, the model and the paged KV cache, one step at a time.

One :meth:`LLMEngine.step`::

    Scheduler.schedule()      admit / prefill, reserve decode slots, preempt   (host, Python ints)
    model.prefill(...)        new requests' tokens, several sequences per forward
    model.decode(...)         one token for every running sequence, paged attention
    sample                    greedy argmax on the device, one device→host copy per forward
    append / finish           stop tokens, max_tokens; finished sequences free their blocks
"""
from __future__ import annotations

import time

import numpy as np

from ..backend import get_backend, to_numpy
from ..kv_cache import KVCache
from ..manager import PagedAttentionManager
from ..model import DecodeBatch, LlamaModel, ModelWeights, PrefillBatch, get_config, random_weights
from ..model.config import ModelConfig
from .config import EngineConfig
from .metrics import EngineMetrics, StepMetrics, StepTiming
from .request import Branch, Request, RequestOutput
from .sampling import SamplingParams, sample
from .scheduler import PrefillWork, Scheduler, SchedulerOutput


class LLMEngine:
    """A small inference engine on the paged KV cache.

    Args:
        config: the engine's settings (model preset, dtype, device, pool size, limits, scheduling).
        model_config, weights: use these instead of random weights for ``config.model`` (a checkpoint).
    """

    def __init__(self, config: EngineConfig | None = None, *, model_config: ModelConfig | None = None,
                 weights: ModelWeights | None = None):
        self.config = config = config or EngineConfig()
        self.backend = get_backend(config.device)
        self.model_config = model_config or get_config(config.model)
        if weights is None:
            weights = random_weights(self.model_config, seed=config.seed, dtype=config.dtype, device=self.backend)
        self.model = LlamaModel(self.model_config, weights, self.backend, max_positions=config.max_model_len,
                                fused=config.fused)
        self.kv_cache = self._build_cache()
        self.manager = PagedAttentionManager(self.kv_cache)
        self.scheduler = Scheduler(config.scheduler_config(), self.manager)
        self.requests: dict[int, Request] = {}
        self.totals = EngineMetrics()
        self.step_metrics: list[StepMetrics] = []
        self._next_id, self._t0 = 0, None
        self.last_step_timing = StepTiming()
        self.graphs = self.prefill_graphs = self.graph_error = None
        if config.cuda_graph and self.backend.is_gpu:
            from .cuda_graph import PREFILL_BUCKETS, PREFILL_LOGIT_ROWS, DecodeGraphs

            max_blocks = -(-config.max_model_len // config.block_size)
            self.graphs = DecodeGraphs(self.model, self.kv_cache, config.max_num_seqs, max_blocks)
            self.prefill_graphs = DecodeGraphs(self.model, self.kv_cache,
                                               min(PREFILL_BUCKETS[-1], config.max_num_batched_tokens), max_blocks,
                                               PREFILL_BUCKETS, PREFILL_LOGIT_ROWS)

    @classmethod
    def from_checkpoint(cls, folder, config: EngineConfig | None = None) -> LLMEngine:
        """An engine on a Hugging Face checkpoint folder (weights in ``config.dtype``)."""
        from ..model import load_checkpoint

        config = config or EngineConfig()
        model_config, weights = load_checkpoint(folder, dtype=config.dtype, device=get_backend(config.device))
        return cls(config, model_config=model_config, weights=weights)

    def _build_cache(self) -> KVCache:
        c, m = self.config, self.model_config
        shape = dict(num_layers=m.num_layers, block_size=c.block_size, num_kv_heads=m.num_kv_heads,
                     head_dim=m.head_dim, dtype=self.model.dtype, device=self.backend.name)
        budget = c.kv_memory_bytes
        if c.num_blocks is None and budget is None and self.backend.is_gpu:
            budget = int(0.4 * self.backend.xp.cuda.Device().mem_info[0])
        if budget is not None:
            return KVCache.from_memory_budget(budget, **shape)
        return KVCache(num_blocks=c.num_blocks or 1024, **shape)

    # ---------------------------------------------------------------------------------------- requests
    def add_request(self, prompt_token_ids, params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. Bad input raises ``ValueError`` and changes nothing."""
        request = self._make_request(self._next_id, prompt_token_ids, params)
        self.scheduler.add(request)  # refuses requests that can never fit
        self.requests[request.request_id] = request
        self._next_id += 1
        return request.request_id

    def _make_request(self, request_id: int, prompt_token_ids, params) -> Request:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        return Request(request_id, self._check_prompt(prompt_token_ids), params)

    def _check_prompt(self, prompt_token_ids) -> list[int]:
        ids = np.asarray(prompt_token_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"prompt_token_ids must be a non-empty 1-D list of ints, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt_token_ids must be ints, got dtype {ids.dtype}")
        bad = np.flatnonzero((ids < 0) | (ids >= self.model_config.vocab_size))
        if bad.size:
            raise ValueError(f"prompt token {int(ids[bad[0]])} at index {int(bad[0])} is outside the vocabulary "
                             f"[0, {self.model_config.vocab_size})")
        return [int(t) for t in ids]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # -------------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Schedule, run prefill and decode forwards, sample; returns the requests that advanced."""
        return [r.output() for r in self._step().values()]

    def _step(self) -> dict[int, Request]:
        start = time.perf_counter()
        self._t0 = start if self._t0 is None else self._t0
        out = self.scheduler.schedule()
        timing = StepTiming(schedule_s=time.perf_counter() - start)
        advanced: dict[int, Request] = {}
        if out.prefills:
            self._run_prefills(out.prefills, advanced)
        t_mid = time.perf_counter()
        timing.prefill_s = t_mid - start - timing.schedule_s
        if out.decodes:
            self._run_decode(out.decodes, advanced, timing)
        end = time.perf_counter()
        self.last_step_timing = timing
        self._account(out, start, t_mid, end)
        return advanced

    def _run_prefills(self, works: list[PrefillWork], advanced) -> None:
        for chunk in _chunks(works, self.config.max_num_batched_tokens):
            seq_ids = [w.branches[0].seq_id for w in chunk]
            batch = PrefillBatch(
                token_ids=np.concatenate([np.asarray(w.token_ids, dtype=np.int64) for w in chunk]),
                positions=np.concatenate([np.arange(len(w.token_ids), dtype=np.int64) for w in chunk]),
                slot_mapping=np.concatenate([self.manager.slots(s, 0, len(w.token_ids))
                                             for s, w in zip(seq_ids, chunk)]),
                seq_lens=[len(w.token_ids) for w in chunk], num_cached=[0] * len(chunk),
                block_tables=[self.manager.block_table(s) for s in seq_ids])
            logits = self._prefill_graph(batch) if self.prefill_graphs is not None else None
            if logits is None:
                logits = self.model.prefill(batch, self.kv_cache)
            rows = [(w.request, b, i) for i, w in enumerate(chunk) for b in w.branches]
            self._sample(logits, rows, advanced)

    def _run_decode(self, decodes: list[tuple[Request, Branch]], advanced, timing: StepTiming) -> None:
        t0 = time.perf_counter()
        seq_ids = [b.seq_id for _, b in decodes]
        tokens = np.array([b.output_token_ids[-1] for _, b in decodes], dtype=np.int32)
        positions = np.array([len(r.prompt_token_ids) + len(b.output_token_ids) - 1 for r, b in decodes],
                             dtype=np.int32)
        tables = self.manager.block_tables(seq_ids)
        bs = self.manager.block_size
        slots = tables[np.arange(len(seq_ids)), positions // bs].astype(np.int64) * bs + positions % bs
        lens = positions + 1
        t1 = time.perf_counter()
        logits = self._decode_graph(tokens, lens, tables, slots) if self.graphs is not None else None
        if logits is None:
            logits = self.model.decode(self.decode_batch(tokens, lens, tables, slots), self.kv_cache)
        t2 = time.perf_counter()
        self._sample(logits, [(r, b, i) for i, (r, b) in enumerate(decodes)], advanced)
        timing.decode_prepare_s, timing.decode_issue_s = t1 - t0, t2 - t1
        timing.decode_sync_sample_s = time.perf_counter() - t2

    def _decode_graph(self, tokens, lens, tables, slots):
        try:
            return self.graphs.run(tokens, lens, tables, slots)
        except Exception as exc:  # NOTE: capture can fail on some stacks; fall back to eager launches
            self._drop_graphs(exc)
            return None

    def _prefill_graph(self, batch: PrefillBatch):
        """A prefill chunk replayed as one graph (rows = tokens), or None when it does not fit the buckets."""
        g = self.prefill_graphs
        tables = batch.token_block_tables()
        if not g.fits(len(batch.token_ids), len(batch.seq_lens)) or tables.shape[1] > g.max_blocks:
            return None
        try:
            return g.run(np.asarray(batch.token_ids, dtype=np.int32), np.asarray(batch.positions, dtype=np.int32) + 1,
                         tables, batch.slot_mapping, np.cumsum(batch.seq_lens) - 1)
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
        packed = xp.asarray(np.concatenate([tokens, lens - 1, lens, tables.ravel()]))
        return DecodeBatch(token_ids=packed[:num], positions=packed[num:2 * num], slot_mapping=xp.asarray(slots),
                           context_lens=packed[2 * num:3 * num], block_tables=packed[3 * num:].reshape(tables.shape))

    def _sample(self, logits, rows, advanced) -> None:
        """Greedy rows: argmax on the device; others: their logits to the host, sampled with each branch's rng."""
        xp = self.backend.xp
        greedy = to_numpy(xp.argmax(logits, axis=-1)).tolist()
        sampled = [i for i, (r, _, _) in enumerate(rows) if not r.params.greedy]
        host = None
        if sampled:
            idx = np.array(sorted({rows[i][2] for i in sampled}))
            host = dict(zip(idx.tolist(), to_numpy(logits[xp.asarray(idx)].astype(np.float32))))
        for request, branch, row in rows:
            token = greedy[row] if request.params.greedy else sample(host[row], request.params, branch.rng)
            self._append(request, branch, token)
            advanced[request.request_id] = request

    def _append(self, request: Request, branch: Branch, token: int) -> None:
        p = request.params
        branch.output_token_ids.append(token)
        if token in p.stop_token_ids or (not p.ignore_eos and token == self.config.eos_token_id):
            branch.finish_reason = "stop"
        elif len(branch.output_token_ids) >= p.max_tokens:
            branch.finish_reason = "length"
        if branch.finished:
            self.scheduler.finish_branch(request, branch)

    def _account(self, out: SchedulerOutput, start: float, mid: float, end: float) -> None:
        t, bm = self.totals, self.manager.block_manager
        t.num_steps += 1
        t.num_prefill_tokens += out.num_prefill_tokens
        t.num_decode_tokens += len(out.decodes)
        t.num_generated_tokens += len(out.decodes) + sum(len(w.branches) for w in out.prefills)
        t.prefill_time_s += (mid - start) if out.prefills else 0.0
        t.decode_time_s += end - mid
        t.num_preemptions, t.num_cow_copies = self.scheduler.num_preemptions, self.manager.num_cow_copies
        t.num_used_blocks, t.num_free_blocks = bm.num_used_blocks, bm.num_free_blocks
        if self.config.record_steps:
            self.step_metrics.append(self._step_metrics(out, start, end))

    def _slot_usage(self):
        """(pool usage, filled token slots): positions reserved ahead to a block's end are not filled yet."""
        usage = self.manager.usage()
        ahead = sum(b.num_reserved - (len(r.prompt_token_ids) + len(b.output_token_ids) - 1)
                    for r in self.scheduler.running for b in r.active_branches() if b.seq_id is not None)
        return usage, usage.num_token_slots_used - ahead

    def _step_metrics(self, out: SchedulerOutput, start: float, end: float) -> StepMetrics:
        usage, used = self._slot_usage()
        return StepMetrics(
            step=self.totals.num_steps, time_s=end - self._t0, duration_s=end - start,
            num_running=sum(len(r.active_branches()) for r in self.scheduler.running),
            num_waiting=len(self.scheduler.waiting), num_prefill_tokens=out.num_prefill_tokens,
            num_decode_tokens=len(out.decodes), num_preempted=len(out.preempted),
            num_used_blocks=usage.num_used_blocks, num_free_blocks=usage.num_free_blocks,
            num_token_slots_used=used, num_token_slots_reserved=usage.num_token_slots_reserved,
            utilization=used / usage.num_token_slots_reserved if usage.num_token_slots_reserved else 1.0)

    def metrics(self) -> EngineMetrics:
        """Totals so far, with the KV pool's current block and token-slot usage."""
        (usage, used), t = self._slot_usage(), self.totals
        t.num_used_blocks, t.num_free_blocks = usage.num_used_blocks, usage.num_free_blocks
        t.num_token_slots_used, t.num_token_slots_reserved = used, usage.num_token_slots_reserved
        t.utilization = used / usage.num_token_slots_reserved if usage.num_token_slots_reserved else 1.0
        return t

    # ---------------------------------------------------------------------------------------- generate
    def generate(self, prompts, params=None, *, progress: bool = True) -> list[RequestOutput]:
        """Run ``prompts`` (lists of token ids) to completion; outputs in the prompts' order.

        Args:
            params: one SamplingParams for all, or one per prompt. Every request is validated before
                any is queued.
        """
        params = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        for prompt, p in zip(prompts, params):  # validate all first: nothing is queued on an error
            self.scheduler.check_fits(self._make_request(-1, prompt, p))
        ids = [self.add_request(prompt, p) for prompt, p in zip(prompts, params)]
        self._drive(set(ids), progress)
        return [self.requests.pop(i).output() for i in ids]

    def _drive(self, ids: set[int], progress: bool) -> None:
        from rich.progress import Progress

        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("generating", total=len(ids))
            while any(not self.requests[i].finished for i in ids):
                self._step()
                done = sum(self.requests[i].finished for i in ids)
                bar.update(task, completed=done,
                           description=f"generating ({self.totals.num_generated_tokens} tokens)")


def _chunks(works: list[PrefillWork], max_tokens: int):
    """Split prefill work into forwards of at most ``max_tokens`` tokens (a longer one runs alone)."""
    chunk, size = [], 0
    for w in works:
        if chunk and size + len(w.token_ids) > max_tokens:
            yield chunk
            chunk, size = [], 0
        chunk.append(w)
        size += len(w.token_ids)
    if chunk:
        yield chunk
