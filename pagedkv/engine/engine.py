"""LLMEngine: the request loop — requests in, tokens out, one step at a time.

One :meth:`LLMEngine.step`::

    Scheduler.schedule()     the policy: decodes, prefill chunks, admission, preemption   (host, Python ints)
    ModelRunner.launch()     the step's forward and sampling enqueued on the device; the engine commits it:
                             computed positions, forks, a placeholder for each token being sampled
    ModelRunner.wait()       the sampled tokens (one device→host copy) of the step being retired
    OutputProcessor          fill tokens, logprobs, text; stop on EOS / stop ids / stop strings / length
    outputs                  every request that got tokens (or finished); a finished one is then released

Asynchronous scheduling (``EngineConfig.async_scheduling``, on by default on a GPU): a step call launches step
``N + 1`` *before* it waits for step ``N``'s tokens, so the host schedules, builds metadata and processes outputs
while the device computes::

    host     | schedule N+1 | launch N+1 | wait N | retire N || schedule N+2 | launch N+2 | wait N+1 | ...
    device   |======== step N ==========|========= step N+1 ==============|======== step N+2 ...

Step ``N + 1`` is scheduled while step ``N``'s tokens are placeholders: a decode row feeds its token from the
device buffer of sampled tokens, and a branch whose token ``N`` certainly ends it (``max_tokens``) is finished
for the scheduler when step ``N + 1`` launches, so the schedule is the synchronous engine's. Only an end that
depends on a value (EOS, a stop token, a stop string) is known one step late: that branch is in step ``N + 1``
too (one wasted row), its token ``N + 1`` is dropped and its blocks are freed at retire ``N`` — outputs are
the same. (vLLM's async scheduling makes the same trade; the one-step-late launch order ``launch N, process
N - 1`` would hide the output processing only, not the scheduling and metadata of the next step.)

NOTE: the step after a value-dependent end holds one more row than the synchronous engine's. Decode kernel 3
balances its split-K over the whole batch, so a sequence's attention can round differently in another batch:
float32 logprobs may then differ in the last bits (tokens agreed in every test); with length ends only (W1)
the steps are the synchronous engine's, row for row.

Promises (tested in tests/test_engine_lifecycle.py):

- A request is validated before anything changes (``ValueError`` naming the problem); one that could never
  run (``n > max_num_seqs``, longer than ``max_model_len``, more blocks than the pool) is refused, never queued.
- A step that raises (a forward error, ``KeyboardInterrupt``) aborts the requests it scheduled (and, when
  retiring fails, those of the step in flight), frees their blocks and re-raises; their final outputs
  (finish_reason "abort") come with the next ``step()``. An exception inside ``generate`` aborts that call's
  requests. The engine stays usable.
- One caller at a time: every public method holds the engine's reentrant lock (:mod:`serialized`), so calls
  from several threads are served one after another, never interleaved inside a step (a server still runs
  one engine loop and queues to it: a thread blocked on the lock waits for a whole ``generate``).

Over 400 lines because add / abort / step / outputs and their failure handling share the request table and
the one lock that serializes callers.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from ..backend import dtype_of, get_backend
from ..cache.block_hash import BlockHasher
from ..cache.manager import PagedAttentionManager
from ..model import ModelWeights, get_config, random_weights
from ..model.config import ModelConfig
from .build import build_model, default_params, read_generation
from .config import EngineConfig
from .metrics import (EngineMetrics, StepMetrics, StepTiming, account_prefix_cache, account_step, slot_usage,
                      step_metrics)
from . import step_commit
from .kv_calibration import calibrate_kv_scales
from .serialized import Serialization, abort_soon, serialized
from .runner.model_runner import InFlight, ModelRunner
from .output_processor import OutputProcessor
from .sched.prefix_cache import PrefixCache
from .request import Request, RequestOutput
from ..sampling_params import SamplingParams
from .request_params import resolve_params
from .validation import check_prompt, check_request_id, check_stop_strings
from .sched.scheduler import Scheduler
from .sched.step_plan import SchedulerOutput


class LLMEngine:
    """A small inference engine on the paged KV cache.

    Args:
        config: the engine's settings (model preset, dtype, device, pool size, limits, scheduling).
        model_config, weights: use these instead of random weights for ``config.model`` (a checkpoint).
        tokenizer: a ``pagedkv.text.Tokenizer`` (or None): outputs then carry text, and stop strings work.
        kv_scales: ``(k_scales, v_scales)`` per layer for an fp8 KV cache (a checkpoint's; default 1.0).
    """

    def __init__(self, config: EngineConfig | None = None, *, model_config: ModelConfig | None = None,
                 weights: ModelWeights | None = None, tokenizer=None, kv_scales=None):
        self.config = config = config or EngineConfig()
        self.serial = Serialization()
        self.backend = get_backend(config.device)
        self.model_config = model_config or get_config(config.model)
        if weights is None:
            weights = random_weights(self.model_config, seed=config.seed, dtype=config.dtype or "float32",
                                     device=self.backend)
        dtype = np.dtype(weights.embed.dtype)
        if config.dtype is not None and dtype_of(config.dtype) != dtype:
            raise ValueError(f"the weights are {dtype} but config.dtype is {config.dtype}")
        self.model, self.kv_cache, self.max_model_len = build_model(config, self.model_config, weights, dtype,
                                                                    self.backend, kv_scales)
        self.manager = PagedAttentionManager(self.kv_cache, enable_prefix_caching=config.enable_prefix_caching)
        prefix_cache = None
        if config.enable_prefix_caching:  # NOTE: one engine, one set of weights: the model's shapes name it
            hasher = BlockHasher.for_model(repr(self.model_config), str(dtype), config.block_size)
            prefix_cache = PrefixCache(self.manager, hasher)
        self.scheduler = Scheduler(config.scheduler_config(self.max_model_len), self.manager, prefix_cache)
        self.runner = ModelRunner(self.model, self.kv_cache, block_size=self.manager.block_size,
                                  max_num_seqs=config.max_num_seqs,
                                  max_num_batched_tokens=config.max_num_batched_tokens,
                                  max_model_len=self.max_model_len, cuda_graph=config.cuda_graph, seed=config.seed,
                                  cascade_attention=_cascade_choice(config, self.backend, dtype),
                                  tensor_core_decode=config.tensor_core_decode)
        self.async_scheduling = config.async_scheduling if config.async_scheduling is not None else \
            self.backend.is_gpu
        self._inflight: InFlight | None = None  # a launched step not yet retired (between step() calls)
        self.eos_token_ids = config.eos_token_ids
        self.output_processor = OutputProcessor(self.eos_token_ids, tokenizer)
        self.runner.lists.eos_token_ids, self.runner.lists.tokenizer = self.eos_token_ids, tokenizer
        self.default_params = SamplingParams()
        self.requests: dict = {}  # live requests (waiting or running) by id
        self._unreported: dict = {}  # requests with output not yet returned by step(), by id
        self._next_id = 0
        self.totals = EngineMetrics()
        self.step_metrics: list[StepMetrics] = []
        self._t0 = None
        self.last_step_timing = StepTiming()
        self._calibrate_pending = config.calculate_kv_scales and self.kv_cache.is_fp8

    @classmethod
    def from_checkpoint(cls, folder, config: EngineConfig | None = None, *, tokenizer=None) -> LLMEngine:
        """An engine on a Hugging Face checkpoint folder: weights in ``config.dtype`` (None: the checkpoint's),
        EOS ids (unless ``config.eos_token_id`` is set) and default sampling parameters from its configs."""
        from ..model import load_checkpoint
        from ..model.kv_scales import load_kv_scales

        config = config or EngineConfig()
        model_config, weights = load_checkpoint(folder, dtype=config.dtype, device=get_backend(config.device))
        generation = read_generation(folder)
        if config.eos_token_id is None and generation.eos_token_ids:
            config = replace(config, eos_token_id=generation.eos_token_ids)
        kv_scales = load_kv_scales(folder, model_config.num_layers) if config.kv_cache_dtype != "auto" else None
        engine = cls(config, model_config=model_config, weights=weights, tokenizer=tokenizer, kv_scales=kv_scales)
        engine.default_params = default_params(generation.defaults, folder)
        return engine

    @property
    def tokenizer(self):
        return self.output_processor.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self.output_processor.tokenizer = self.runner.lists.tokenizer = tokenizer
        self.runner.grammars = None  # made again for this tokenizer at the next structured request

    # ---------------------------------------------------------------------------------------- requests
    @serialized
    def check_request(self, prompt_token_ids, params: SamplingParams | None = None, *, request_id=None,
                      prompt: str | None = None) -> None:
        """Raise the ``ValueError`` that :meth:`add_request` would raise; changes nothing."""
        self._validated(prompt_token_ids, params, request_id, prompt)

    @serialized
    def add_request(self, prompt_token_ids, params: SamplingParams | None = None, *, request_id=None,
                    prompt: str | None = None):
        """Queue a request; returns its id (``request_id`` if given: a str or int unique among the requests
        the engine holds). ``params`` None: the engine's ``default_params``. Bad input raises ``ValueError``
        and changes nothing."""
        ids, params = self._validated(prompt_token_ids, params, request_id, prompt)
        if request_id is None:
            request_id = self._new_id()
        request = Request(request_id, ids, params, prompt=prompt)
        self.scheduler.add(request)
        self.requests[request_id] = request
        return request_id

    def _validated(self, prompt_token_ids, params, request_id, prompt) -> tuple[list[int], SamplingParams]:
        params = self.default_params if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = check_prompt(prompt_token_ids, self.model_config.vocab_size)
        if request_id is not None:
            check_request_id(request_id, in_use=(self.requests, self._unreported))
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str or None, got {type(prompt).__name__}")
        check_stop_strings(params.stop, self.config.max_stop_strings, self.config.max_stop_string_len)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings {params.stop!r} need a tokenizer on the engine (use stop_token_ids)")
        ids, params = resolve_params(params, ids, self.max_model_len, self.runner.lists, self._grammars(params))
        self.scheduler.check_fits(len(ids), params)
        return ids, params

    def _grammars(self, params: SamplingParams):
        """The runner's structured-output grammars (made at the first structured request; None: no tokenizer)."""
        if params.structured_outputs is not None and self.runner.grammars is None and self.tokenizer is not None:
            from .runner.structured import Grammars

            self.runner.grammars = Grammars(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        return self.runner.grammars

    def _new_id(self) -> int:
        while self._next_id in self.requests or self._next_id in self._unreported:
            self._next_id += 1
        self._next_id += 1
        return self._next_id - 1

    @serialized
    def abort_request(self, request_id) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (unfinished branches end with
        "abort"), or None for an unknown or already released id. Its output is not returned by ``step()``."""
        try:
            request = self._unreported.pop(request_id, None)
        except TypeError:  # unhashable: no such request
            return None
        if request is not None and request.request_id not in self.requests:
            return request.output()  # finished (or aborted by a failed step): final output not yet returned
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self._abort(request)
        return request.output()

    def abort_request_soon(self, request_id) -> None:
        """Abort ``request_id`` as soon as no call holds the engine (at once if none does); safe from a
        finalizer or ``__del__`` on any thread."""
        abort_soon(self, request_id)

    def _abort(self, request: Request) -> None:
        self.scheduler.abort(request)
        request.aborted = True
        for b in request.branches:
            b.drop_placeholders()
            if not b.finished:
                b.finish_reason = "abort"
                self.output_processor.flush(b)
        request.metrics.finished_time = time.perf_counter()

    @serialized
    def has_unfinished_requests(self) -> bool:
        """True while a request waits, runs, has tokens in flight or output that ``step()`` has not returned yet."""
        return self.scheduler.has_unfinished or bool(self._unreported) or step_commit.live(self._inflight)

    # -------------------------------------------------------------------------------------------- step
    @serialized
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, sample; returns every request that got tokens or finished (including
        those advanced by a ``generate`` call of another caller). Finished requests are then released."""
        self._step()
        reported, self._unreported = self._unreported, {}
        return [r.output() for r in reported.values()]

    def _step(self) -> dict:
        """Launch the next step (with asynchronous scheduling: while the one in flight runs), retire the one in
        flight; returns the requests its tokens advanced."""
        if self._calibrate_pending and self.scheduler.waiting:
            self._calibrate_kv_scales()
        start = time.perf_counter()
        self._t0 = start if self._t0 is None else self._t0
        timing = StepTiming()
        if self._inflight is None:
            self._inflight = self._launch_next(timing)
            if self._inflight is None:
                return {}
            step_commit.apply_endings(self._inflight, self.scheduler)  # nothing runs before it: its ends hold
        retired = self._inflight
        following = self._launch_next(timing) if self.async_scheduling else None
        self._inflight = following
        try:
            advanced = self._retire(retired, timing)
            if following is not None and following.deferred:  # structured rows: masks from the tokens just retired
                self.runner.finish(following)
        except BaseException:
            self._abort_failed(_requests_of(retired, following))
            self._inflight = None
            raise
        t0 = time.perf_counter()
        if following is not None:
            step_commit.catch_up(following, self.scheduler)
            step_commit.apply_endings(following, self.scheduler)
        timing.process_s += time.perf_counter() - t0
        self._unreported.update(advanced)
        self._account(retired.out, start, time.perf_counter())
        self.last_step_timing = timing
        return advanced

    def _calibrate_kv_scales(self) -> None:
        """``calculate_kv_scales``: fp8 scales from the waiting prompts, once, before the first step (graphs
        captured earlier are dropped: they carry the old scales)."""
        self._calibrate_pending = False
        calibrate_kv_scales(self.model, self.kv_cache, [r.prompt_token_ids for r in self.scheduler.waiting],
                            self.config.max_num_batched_tokens)
        for graphs in (self.runner.graphs, self.runner.prefill_graphs):
            if graphs is not None:
                graphs.clear()

    def _launch_next(self, timing: StepTiming) -> InFlight | None:
        """Schedule and launch a step (None when there is nothing to run), committed (:mod:`step_commit`)."""
        t0 = time.perf_counter()
        try:
            out = self.scheduler.schedule()
        except BaseException:
            self._abort_failed(list(self.scheduler.running))
            raise
        timing.schedule_s += time.perf_counter() - t0
        if not out.seqs:
            return None
        try:
            flight = self.runner.launch(out)
            step_commit.commit(flight, self.scheduler, self.output_processor)
        except BaseException:
            self._abort_failed(list({id(s.request): s.request for s in out.seqs}.values()))
            raise
        timing.prepare_s += flight.timing.prepare_s
        timing.launch_s += flight.timing.launch_s
        return flight

    def _retire(self, flight: InFlight, timing: StepTiming) -> dict:
        """Wait for the step's tokens and fill them in; finished requests leave the engine's table."""
        result = self.runner.wait(flight)
        timing.wait_s, timing.gpu_s = flight.timing.wait_s, flight.timing.gpu_s
        now = time.perf_counter()
        advanced = step_commit.retire(flight, result, self.scheduler, self.output_processor, now)
        for request in advanced.values():
            if request.finished:
                request.metrics.finished_time = now
                self.requests.pop(request.request_id, None)
        timing.process_s += time.perf_counter() - now
        return advanced

    def _abort_failed(self, requests: list[Request], report: bool = True) -> None:
        """After a failure: abort ``requests`` (their outputs reported by the next step) and free any sequence
        no request holds any more."""
        for request in requests:
            if self.requests.pop(request.request_id, None) is not None:
                self._abort(request)
                if report:
                    self._unreported[request.request_id] = request
        self.scheduler.free_orphans()

    # -------------------------------------------------------------------------------------- generate
    @serialized
    def generate(self, prompts, params=None, *, progress: bool = True) -> list[RequestOutput]:
        """Run ``prompts`` (lists of token ids) to completion; outputs in the prompts' order.

        Args:
            params: one SamplingParams for all, or one per prompt. Every request is validated before any is
                queued. An exception (or ``KeyboardInterrupt``) aborts this call's requests and re-raises.
        """
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        for prompt, p in zip(prompts, params):  # validate all first: nothing is queued on an error
            self.check_request(prompt, p)
        ids: list = []
        try:
            ids.extend(self.add_request(prompt, p) for prompt, p in zip(prompts, params))
            requests = [self.requests[i] for i in ids]
            self._drive(requests, progress)
        except BaseException:
            self._abort_failed([r for r in (self.requests.get(i) for i in ids) if r is not None], report=False)
            for i in ids:
                self._unreported.pop(i, None)
            raise
        return [r.output() for r in requests]

    def _drive(self, requests: list[Request], progress: bool) -> None:
        from rich.progress import Progress

        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("generating", total=len(requests))
            while any(not r.finished for r in requests):
                self._step()
                for r in requests:
                    self._unreported.pop(r.request_id, None)
                bar.update(task, completed=sum(r.finished for r in requests),
                           description=f"generating ({self.totals.num_generated_tokens} tokens)")

    # --------------------------------------------------------------------------------------- metrics
    def _account(self, out: SchedulerOutput, start: float, end: float) -> None:
        account_step(self.totals, out, end - start)
        t, m = self.totals, self.manager
        t.num_preemptions, t.num_cow_copies = self.scheduler.num_preemptions, m.num_cow_copies
        t.num_used_blocks, t.num_free_blocks = m.num_used_blocks, m.num_free_blocks
        if self.config.record_steps:
            self.step_metrics.append(step_metrics(self.scheduler, out, self.totals.num_steps, end - self._t0,
                                                  end - start))

    @serialized
    def metrics(self) -> EngineMetrics:
        """Totals so far, with the KV pool's current block and token-slot usage."""
        (usage, used), t = slot_usage(self.scheduler), self.totals
        t.num_used_blocks, t.num_free_blocks = usage.num_used_blocks, usage.num_free_blocks
        t.num_token_slots_used, t.num_token_slots_reserved = used, usage.num_token_slots_reserved
        t.utilization = used / usage.num_token_slots_reserved if usage.num_token_slots_reserved else 1.0
        account_prefix_cache(t, self.scheduler.prefix_cache, self.manager.cache_counts())
        return t

    # ------------------------------------------------------------------ the model runner's CUDA graphs
    @property
    def graphs(self):
        return self.runner.graphs

    @property
    def prefill_graphs(self):
        return self.runner.prefill_graphs

    @property
    def graph_error(self):
        return self.runner.graph_error

    def warmup_graphs(self) -> None:
        self.runner.warmup_graphs()


def _requests_of(*flights) -> list[Request]:
    """The requests of the launched steps (None entries skipped), each once."""
    return list({id(s.request): s.request for f in flights if f is not None for s in f.out.seqs}.values())


def _cascade_choice(config: EngineConfig, backend, dtype) -> bool | None:
    """The runner's ``cascade_attention``: None with tensor parallelism (its ranks' backends are not asked),
    else the config's choice, by default on for 16-bit models on a GPU."""
    if config.tensor_parallel_size > 1:
        return None
    if config.cascade_attention is not None:
        return config.cascade_attention
    return backend.is_gpu and np.dtype(dtype).itemsize == 2
