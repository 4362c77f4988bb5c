"""The model runner: a scheduled step in, its forward and sampling enqueued on the device, the tokens out later.

    launch(out)   host: the step's layout (:mod:`batch_layout`) from the persistent per-sequence rows
                  (:mod:`seq_tables`) into one packed input buffer, one host→device copy (:mod:`step_inputs`)
                  device, in stream order: the forward (a CUDA graph where it fits), sampling on the device,
                  extra branches and logprobs (eager), one device→host copy of the sampled tokens, an event
    wait(flight)  blocks on that event; returns the tokens (and logprobs) of the step

``launch`` returns as soon as the work is enqueued, so the engine can schedule and launch the next step while
the device runs this one. A row whose token the step before is still sampling reads it on the device from the
buffer of sampled tokens (nothing waits for the host). Rows that want logits: the last token of every sequence
that samples (a decode, or a prompt's last chunk) and, for requests asking for ``prompt_logprobs``, every prompt
token whose successor is a prompt token. The runner reads the scheduler's work and changes no request.

Over 400 lines because the eager and captured forwards, the cascade variants and device sampling share the
static buffers they launch from.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ...model import DecodeBatch, PrefillBatch
from .batch_layout import Layout, decode_layout, fill_rows, fill_samples, fill_seqs, prefill_layout
from .cuda_graph import PREFILL_BUCKETS, PREFILL_LOGIT_ROWS, CudaGraphs
from .logits_process import LogitsState, RequestLists, count_tokens, processes
from .logprob_rows import LogprobRequests
from ..metrics import StepTiming
from ..request import PLACEHOLDER
from .sampler import SAMPLING_FIELDS, SamplingTensors, sample
from .seq_tables import SequenceTables
from .step_inputs import HostCopy, InputShape, StepInputs, feed_tokens
from ..sched.step_plan import SchedulerOutput
from .structured_rows import StructuredRows


@dataclass(slots=True)
class StepResult:
    """``tokens[pos]``: the token sampled at position ``pos`` of the step's sampled buffer; ``logprobs[pos]``:
    its ``(entries, logprob)`` when its params ask; ``prompt_logprobs``: ``(request, position, entries)``."""

    tokens: np.ndarray
    logprobs: dict = field(default_factory=dict)
    prompt_logprobs: list = field(default_factory=list)


@dataclass(slots=True)
class InFlight:
    """A launched step. ``positions[i]``: sampled positions of ``out.seqs[i]``'s sample branches; ``samples`` and
    ``endings`` are the engine's (the placeholders it made, the branches that end with this step)."""

    out: SchedulerOutput
    positions: list
    tokens: np.ndarray | None = None
    copies: HostCopy | None = None
    logprobs: LogprobRequests | None = None
    keep: tuple = ()  # buffers the device still reads or writes (freed at retire)
    samples: list = field(default_factory=list)
    endings: list = field(default_factory=list)
    timing: StepTiming = field(default_factory=StepTiming)
    events: tuple | None = None
    pending: tuple | None = None  # launched, not finished: (logits, device views, host views, layout, ...)

    @property
    def deferred(self) -> bool:
        """Structured rows wait for the step before (their masks need its tokens): :meth:`ModelRunner.finish`."""
        return self.pending is not None


class ModelRunner:
    """Runs scheduled steps of ``model`` on ``kv_cache``; block ids come in the step plans (never from the
    manager).

    Args:
        block_size: tokens per block of ``kv_cache``.
        max_num_seqs, max_num_batched_tokens, max_model_len: the engine's limits (buffer sizes).
        cuda_graph: replay decode (and small prefill) steps as CUDA graphs on a GPU.
        seed: draws the sampling seeds of requests that have none.
        cascade_attention: let the attention backend run decode steps whose rows share long prefixes as cascade
            attention where its rule says it pays: the backend names the decode variants
            (``model.attention.setup_decode``), the runner keeps one set of decode graphs per variant and replays
            the one ``model.attention.prepare_decode`` answers for each step (it knows no more than that).
            False: set up, switched off; None: the backend is not asked (a model without one, e.g. tensor
            parallel ranks).
        tensor_core_decode: let the backend name its tensor-core decode variant too (decode version 4 on the
            steps where ``pagedkv.kernels.decode.choose_version`` says it pays; not asked when
            ``cascade_attention`` is None).
    """

    def __init__(self, model, kv_cache, *, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, cuda_graph: bool, seed: int = 0, cascade_attention: bool | None = None,
                 tensor_core_decode: bool = False):
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.backend, self.xp = model.backend, model.backend.xp
        self.max_blocks = -(-max_model_len // block_size)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.tables = SequenceTables(block_size, self.max_blocks, max_num_seqs, np.random.default_rng(seed),
                                     on_state_row=self._init_state_row)
        self.logits_state = LogitsState(model.config.vocab_size, max_num_seqs, self.xp)
        self.lists = RequestLists(model.config.vocab_size)  # the engine sets its EOS ids and tokenizer
        self.structured = StructuredRows(self.xp, self.logits_state, max_num_seqs)
        self._graphs_version, self._host_views, self._max_num_seqs = 0, None, max_num_seqs
        capacity = max(max_num_batched_tokens, max_model_len) + 2 * max_num_seqs + PREFILL_LOGIT_ROWS
        self.sampled = self.xp.zeros(capacity, dtype=np.int32)  # every step's tokens, by sampled position
        self._host_tokens = [_pinned(self.xp, capacity) for _ in range(2)] if self.backend.is_gpu else None
        self._turn = 0
        self.decode_inputs = StepInputs(InputShape(max_num_seqs, self.max_blocks, 1, 2 * max_num_seqs), self.xp)
        self.last_timing, self.record_gpu_time, self._start_event = StepTiming(), False, None
        self.variants = () if cascade_attention is None else \
            model.attention.setup_decode(max_num_seqs, block_size, cascade=cascade_attention, kv_cache=kv_cache,
                                         tensor_cores=tensor_core_decode)
        self._ask_backend = cascade_attention is not None
        self.graphs = self.prefill_graphs = self.prefill_inputs = self.graph_error = None
        self.variant_graphs = {}  # decode graphs of the attention backend's variants (cascade, tensor cores)
        if cuda_graph and self.backend.is_gpu:
            rows = min(PREFILL_BUCKETS[-1], max_num_batched_tokens)
            self.prefill_inputs = StepInputs(InputShape(rows, self.max_blocks, PREFILL_LOGIT_ROWS,
                                                        PREFILL_LOGIT_ROWS + max_num_seqs, max_num_seqs), self.xp)
            self._make_graphs()

    def _make_graphs(self) -> None:
        """(Re)made empty: each bucket is captured at its first use (the logits state's buffers were allocated
        or grown since the last capture)."""
        self.graphs = CudaGraphs(lambda rows, out: self._forward(self.decode_inputs, rows, None, out),
                                 lambda rows: self.sampled[:rows], self._max_num_seqs)
        self.variant_graphs = {variant: CudaGraphs(  # the attention backend's decode variants
            lambda rows, out, variant=variant: self._forward(self.decode_inputs, rows, None, out, variant),
            lambda rows: self.sampled[:rows], self._max_num_seqs) for variant in self.variants}
        rows = self.prefill_inputs.shape.rows
        self.prefill_graphs = CudaGraphs(
            lambda rows, out: self._forward(self.prefill_inputs, rows, PREFILL_LOGIT_ROWS, out),
            lambda rows: self.sampled[:PREFILL_LOGIT_ROWS], rows, PREFILL_BUCKETS)
        self._graphs_version = self.logits_state.version

    @property
    def grammars(self):
        """The structured outputs' grammars (:class:`~.structured.Grammars`; set by the engine)."""
        return self.structured.grammars

    @grammars.setter
    def grammars(self, grammars) -> None:
        self.structured.grammars = grammars

    def _ensure_state(self) -> None:
        """The logits state covers every table row. NOTE: twice max_num_seqs at first: rows of sequences that
        ended are recycled one step late, and growing the state later means capturing the graphs again."""
        self.logits_state.ensure(max(self.tables.capacity, 2 * self._max_num_seqs))

    def _init_state_row(self, row: int, s) -> None:
        """A sequence that needs logits state got table row ``row``: its device state row, from its prompt and
        outputs (the last output may still be in flight: read on the device from the sampled buffer)."""
        self._ensure_state()
        b, p = s.branch, s.request.params
        outputs = list(b.output_token_ids)
        srcs = [-1] * len(outputs)
        if outputs and outputs[-1] == PLACEHOLDER:
            outputs[-1], srcs[-1] = 0, b.sample_pos
        self.logits_state.init_row(row, self.lists.words(p), s.request.prompt_token_ids, outputs, srcs,
                                   p.allowed_token_ids, self.sampled)

    # ------------------------------------------------------------------------------------------- launch
    def launch(self, out: SchedulerOutput) -> InFlight:
        """Enqueue one step (``out.seqs`` non-empty; ``out.block_tables`` / ``out.freed_seq_ids`` update the
        persistent tables first). Raises whatever the forward raises (nothing of this step is then enqueued).

        A structured request whose previous token is still in flight cannot have its mask yet: its row is sampled
        again by :meth:`finish`, which the engine calls once that token is on the host (``flight.deferred``);
        the step's token counts, logprobs and read-back wait for it. Otherwise the step is finished here."""
        t0 = time.perf_counter()
        self.tables.update(out.block_tables, out.freed_seq_ids)
        events = self._events() if self.record_gpu_time and self.backend.is_gpu else None
        self._start_event = events[0] if events else None
        seqs = out.seqs
        decode = all(s.num_tokens == 1 and s.sample_branches for s in seqs) and not _wants_prompt_logprobs(out)
        lay = decode_layout(seqs, self.tables) if decode else prefill_layout(seqs, self.tables)
        if self.structured.grammars is not None and any(s.request.params.structured_outputs is not None
                                                        for s in seqs):
            self._ensure_state()
        if self.graphs is not None and self._graphs_version != self.logits_state.version:
            self._make_graphs()
        if self.backend.is_gpu:
            logits, positions, v, keep, t1 = self._launch_gpu(lay, seqs, decode)
        else:
            logits, positions, v, keep, t1 = self._launch_cpu(lay, seqs, decode)
        num_logits = logits.shape[0]
        num_sampled = self._sample_extras(logits, positions, seqs, v, num_logits)
        flight = InFlight(out, positions, keep=keep, events=events)
        flight.pending = (logits, v, self._host_views, lay, num_logits, num_sampled, self.structured.deferred)
        if not self.structured.deferred:
            self.finish(flight)
        flight.timing.prepare_s, flight.timing.launch_s = t1 - t0, time.perf_counter() - t1
        return flight

    def finish(self, flight: InFlight) -> None:
        """The rest of a launched step: deferred structured rows sampled with their masks (needs the tokens of
        the step before on the host), token counts, logprobs, the one device->host copy, the end event."""
        logits, v, host, lay, num_logits, num_sampled, deferred = flight.pending
        flight.pending = None
        if deferred:
            self.structured.resample(logits, host, deferred, flight.positions, flight.out.seqs, self.sampled)
        if self.logits_state.allocated:  # NOTE: after the extras: they read their parent's counts before its token
            count_tokens(self.sampled[:num_logits], v.sampling, self.logits_state)
        flight.logprobs = LogprobRequests(self.xp, logits, self.sampled, flight.positions, flight.out.seqs,
                                          lay.prompt_rows)
        flight.copies = HostCopy(self.xp)
        flight.logprobs.enqueue(flight.copies)
        flight.tokens = self._read_back(num_sampled, flight.copies)
        flight.copies.record()
        if flight.events is not None:
            flight.events[1].record()

    def _launch_gpu(self, lay: Layout, seqs, decode: bool):
        """Fill and upload the inputs, replay a graph (or run eagerly); returns logits and the sample positions.

        Decode steps use the decode kernel (a table per row); prefill and mixed steps the prefill op (a table per
        sequence; decode rows of a mixed step are sequences of one new token)."""
        graphs = self.graphs if decode else self.prefill_graphs
        fits = graphs is not None and lay.num_rows <= graphs.max_rows and (
            decode or len(lay.logit_rows) <= PREFILL_LOGIT_ROWS)
        if decode:
            inputs = self.decode_inputs
        elif fits:
            inputs = self.prefill_inputs
        else:
            extra = sum(len(s.sample_branches) for s in seqs)
            inputs = StepInputs(InputShape(lay.num_rows, self.max_blocks, lay.num_logits, lay.num_logits + extra,
                                           len(seqs)), self.xp, buffers=1)
        rows = graphs.bucket(lay.num_rows) if fits else lay.num_rows
        num_logits = rows if decode else (PREFILL_LOGIT_ROWS if fits else lay.num_logits)
        v = self._host_views = inputs.begin()
        fill_rows(v, lay, self.tables, rows, row_tables=decode)
        if not decode:
            fill_seqs(v, lay, self.tables, inputs.shape.seqs)
        positions = fill_samples(v, lay, seqs, self.tables, num_logits)
        self.structured.fill(v, seqs, positions, num_logits)
        # the attention backend's variant of this decode step (its metadata is uploaded with the inputs)
        variant = self._decode_variant(v, lay.num_rows, rows) if decode else None
        if variant is not None:
            graphs = self.variant_graphs.get(variant)
            fits = fits and graphs is not None
        if self._start_event is not None:  # NOTE: here, not earlier: the GPU time excludes waiting for the host
            self._start_event.record()
        inputs.upload(lay.num_rows if decode else len(seqs))
        t1 = time.perf_counter()
        logits = self._replay(graphs, rows) if fits else None
        if logits is None:
            logits = self._forward(inputs, rows, None if decode else num_logits, self.sampled, variant)
        return logits, positions, inputs.device, (inputs,), t1

    def _decode_variant(self, v, num_rows: int, launch_rows: int | None = None):
        """The attention backend's variant of a decode step from its host rows, launched as ``launch_rows`` rows
        (None: plain decode); the backend uploads whatever metadata the variant needs on the current stream."""
        if not self._ask_backend:
            return None
        return self.model.attention.prepare_decode(v.block_tables, v.context_lens, num_rows, launch_rows)

    def _replay(self, graphs: CudaGraphs, rows: int):
        try:
            return graphs.replay(rows)
        except Exception as exc:  # NOTE: capture can fail on some stacks; fall back to eager launches
            self._drop_graphs(exc)
            return None

    def _forward(self, inputs: StepInputs, rows: int, num_logits: int | None, out, variant=None):
        """Feed, forward and sample on the device views of ``inputs`` (captured as one graph per bucket and
        attention variant)."""
        d, per_seq = inputs.device, inputs.shape.seqs > 0
        feed_tokens(d.token_ids[:rows], d.src_rows[:rows], self.sampled)
        batch = DecodeBatch(token_ids=d.token_ids[:rows], positions=d.positions[:rows],
                            slot_mapping=d.slot_mapping[:rows],
                            block_tables=d.block_tables if per_seq else d.block_tables[:rows],
                            context_lens=d.context_lens if per_seq else d.context_lens[:rows],
                            logit_rows=None if num_logits is None else d.logit_rows[:num_logits],
                            query_start_loc=d.query_start_loc if per_seq else None,
                            attention_variant=variant)
        logits = self.model.decode(batch, self.kv_cache)
        sample(logits, d.sampling, out=out[:logits.shape[0]], state=self.logits_state)
        return logits

    def _launch_cpu(self, lay: Layout, seqs, decode: bool):
        """The host path: the same layout, model.decode (decode steps) or model.prefill (others), NumPy sampler."""
        if decode:
            inputs = self.decode_inputs
        else:
            num = lay.num_logits + sum(len(s.sample_branches) for s in seqs)
            inputs = StepInputs(InputShape(lay.num_rows, 1, lay.num_logits, num), np, buffers=1)
        v = self._host_views = inputs.begin()
        fill_rows(v, lay, self.tables, lay.num_rows, row_tables=decode)
        positions = fill_samples(v, lay, seqs, self.tables, lay.num_logits)
        self.structured.fill(v, seqs, positions, lay.num_logits)
        t1 = time.perf_counter()
        if decode:
            variant = self._decode_variant(v, lay.num_rows)
            return self._forward(inputs, lay.num_rows, None, self.sampled, variant), positions, v, (), t1
        feed_tokens(v.token_ids[:lay.num_rows], v.src_rows[:lay.num_rows], self.sampled)
        batch = PrefillBatch(token_ids=v.token_ids[:lay.num_rows].astype(np.int64), positions=lay.positions,
                             slot_mapping=v.slot_mapping[:lay.num_rows].copy(),
                             seq_lens=[s.num_tokens for s in seqs], num_cached=[s.start for s in seqs],
                             block_tables=[self.tables.tables[row, :-(-s.end // self.block_size)].tolist()
                                           for row, s in zip(lay.table_rows, seqs)],
                             logit_rows=lay.logit_rows)
        logits = self.model.prefill(batch, self.kv_cache)
        sample(logits, v.sampling, out=self.sampled[:logits.shape[0]], state=self.logits_state)
        return logits, positions, v, (), t1

    def _sample_extras(self, logits, positions, seqs, v, num_logits: int) -> int:
        """Sample the extra branches (eager, after the forward); returns the sampled buffer's used length."""
        extra = [(p, pos[0]) for pos in positions if len(pos) > 1 for p in pos[1:]]
        if not extra:
            return num_logits
        first, stop = num_logits, num_logits + len(extra)
        rows = self.xp.asarray(np.array([row for _, row in extra], dtype=np.int64))
        tensors = SamplingTensors(**{f.name: getattr(v.sampling, f.name)[first:stop] for f in SAMPLING_FIELDS})
        processed = None
        if self.logits_state.allocated and any(processes(s.request.params) for s in seqs if len(s.sample_branches) > 1):
            processed = self.xp.empty((len(extra), logits.shape[1]), dtype=np.float32)
        sample(logits[rows], tensors, out=self.sampled[first:stop], state=self.logits_state if processed is not None
               else None, processed=processed)
        return stop

    def _read_back(self, num: int, copies: HostCopy) -> np.ndarray:
        """The one device→host copy of the step's sampled tokens (a copy on the CPU too: the next step reuses
        the buffer before this one is retired)."""
        if self._host_tokens is None:
            return self.sampled[:num].copy()
        self._turn ^= 1
        return copies(self.sampled[:num], out=self._host_tokens[self._turn][:num])

    def _events(self):
        return self.xp.cuda.Event(), self.xp.cuda.Event()

    # --------------------------------------------------------------------------------------------- wait
    def wait(self, flight: InFlight) -> StepResult:
        """Block until the step's tokens are on the host; its tokens and logprobs."""
        t0 = time.perf_counter()
        flight.copies.wait()
        flight.timing.wait_s = time.perf_counter() - t0
        if flight.events is not None:
            flight.timing.gpu_s = self.xp.cuda.get_elapsed_time(*flight.events) / 1e3
        self.last_timing = flight.timing
        flight.keep = ()
        return StepResult(flight.tokens, *flight.logprobs.results(flight.tokens))

    # ------------------------------------------------------------------------------------ raw decode
    def decode_logits(self, tokens, lens, tables, slots):
        """One decode forward of explicit rows (beam search, benchmarks), through the decode graphs when they
        exist: host arrays ``tokens`` [B], ``lens`` [B] (positions + 1), ``tables`` [B, width], ``slots`` [B].
        Returns logits [B, vocab] on the device (a graph's output: valid until the next forward). Nothing of an
        in-flight step may be pending (its sampled tokens would be overwritten)."""
        num, width = len(tokens), tables.shape[1]
        inputs, xp = self.decode_inputs, self.xp
        if num > inputs.shape.rows or width > self.max_blocks:
            batch = DecodeBatch(token_ids=xp.asarray(np.asarray(tokens, dtype=np.int32)),
                                positions=xp.asarray(np.asarray(lens, dtype=np.int32) - 1),
                                slot_mapping=xp.asarray(np.asarray(slots, dtype=np.int64)),
                                block_tables=xp.asarray(np.asarray(tables, dtype=np.int32)),
                                context_lens=xp.asarray(np.asarray(lens, dtype=np.int32)))
            return self.model.decode(batch, self.kv_cache)
        rows = self.graphs.bucket(num) if self.graphs is not None else num
        v = inputs.begin()
        v.token_ids[:num], v.positions[:num], v.context_lens[:num], v.slot_mapping[:num] = tokens, lens - 1, lens, slots
        v.token_ids[num:rows], v.positions[num:rows], v.context_lens[num:rows], v.slot_mapping[num:rows] = 0, 0, 1, -1
        v.src_rows[:rows], v.temperature[:rows], v.flags[:rows] = -1, 0, 0
        v.block_tables[:num, :width], v.block_tables[:num, width:] = tables, 0
        inputs.upload(num)
        logits = self._replay(self.graphs, rows) if self.graphs is not None else None
        if logits is None:
            logits = self._forward(inputs, rows, None, self.sampled)
        return logits[:num]

    # --------------------------------------------------------------------------------------- graphs
    def _drop_graphs(self, exc: Exception) -> None:
        self.graph_error, self.graphs, self.prefill_graphs = f"{type(exc).__name__}: {exc}", None, None
        self.variant_graphs = {}

    def warmup_graphs(self) -> None:
        """Capture the decode and prefill graphs of every bucket now (else lazily, at first use), then run the
        largest eager step once (vLLM's profile run: memory pools grown, cuBLAS heuristics cached)."""
        try:
            decode = [(g, self.decode_inputs) for g in (self.graphs, *self.variant_graphs.values())]
            for graphs, inputs in (*decode, (self.prefill_graphs, self.prefill_inputs)):
                if graphs is not None:
                    inputs.reset()  # NOTE: the warm-up runs write K/V of every row with a slot: none may have one
                    graphs.capture_all()
        except Exception as exc:  # NOTE: as in _replay: fall back to eager launches
            self._drop_graphs(exc)
        if self.backend.is_gpu:
            try:
                self._warm_eager(self.max_num_batched_tokens)
            except self.xp.cuda.memory.OutOfMemoryError:
                pass  # NOTE: the first large step will grow the pools instead (as without the warm-up)

    def _warm_eager(self, num_rows: int) -> None:
        """One eager prefill forward of ``num_rows`` padding rows: no sequence owns them (nothing is attended
        or written), the products and activations run at full size; samples go to a scratch buffer."""
        inputs = StepInputs(InputShape(num_rows, self.max_blocks, 1, 1, 1), self.xp, buffers=1)
        inputs.upload(1)
        self._forward(inputs, num_rows, 1, self.xp.empty(1, dtype=np.int32))
        self.xp.cuda.get_current_stream().synchronize()


def _wants_prompt_logprobs(out: SchedulerOutput) -> bool:
    return any(s.request.params.prompt_logprobs is not None and s.start < s.request.prompt_len - 1 for s in out.seqs)


def _pinned(xp, num: int) -> np.ndarray:
    import cupyx

    return cupyx.empty_pinned(num, dtype=np.int32)
