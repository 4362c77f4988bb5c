"""Prometheus metrics of one server (its own ``CollectorRegistry``: no module-global state), vLLM's names with
the ``pagedkv:`` prefix, and the periodic stats line of the log.

::

    gauges      pagedkv:num_requests_running, pagedkv:num_requests_waiting, pagedkv:kv_cache_usage_perc
                (read from the engine thread at each scrape), pagedkv:kv_num_blocks, pagedkv:kv_num_free_blocks
    counters    pagedkv:prefix_cache_queries_total, pagedkv:prefix_cache_hits_total (tokens),
                pagedkv:prompt_tokens_total, pagedkv:generation_tokens_total,
                pagedkv:request_success_total{finished_reason}, pagedkv:engine_step_errors_total
    histograms  pagedkv:time_to_first_token_seconds, pagedkv:inter_token_latency_seconds,
                pagedkv:e2e_request_latency_seconds, pagedkv:request_queue_time_seconds

Request times are the engine's own stamps (``RequestOutput.metrics``, ``time.perf_counter``) against the moment
the server queued the request (``Sink.submit_time``), so the queue time includes the admission queue.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..text.extras import require

logger = logging.getLogger("pagedkv.serve")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


@dataclass(slots=True)
class EngineSnapshot:
    """The engine's state at one moment (taken on the engine thread by :func:`engine_snapshot`)."""

    num_running: int = 0
    num_waiting: int = 0  # in the engine's queue and in the server's admission queue
    num_blocks: int = 0
    num_free_blocks: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    num_generated_tokens: int = 0
    num_prompt_tokens: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0


def engine_snapshot(engine, num_pending: int = 0) -> EngineSnapshot:
    """Call on the engine thread. Works on an LLMEngine; a stand-in without its parts reports zeros."""
    snap = EngineSnapshot(num_waiting=num_pending)
    scheduler = getattr(engine, "scheduler", None)
    if scheduler is not None:
        snap.num_running, snap.num_waiting = len(scheduler.running), len(scheduler.waiting) + num_pending
    manager = getattr(engine, "manager", None)
    if manager is not None:
        snap.num_blocks, snap.num_free_blocks = manager.num_blocks, manager.num_free_blocks
    elif hasattr(engine, "num_free_blocks"):
        snap.num_blocks, snap.num_free_blocks = engine.num_blocks, engine.num_free_blocks
    if hasattr(engine, "metrics"):
        totals = engine.metrics()
        snap.prefix_query_tokens, snap.prefix_hit_tokens = totals.num_prefix_query_tokens, totals.num_prefix_hit_tokens
        snap.num_generated_tokens, snap.num_prompt_tokens = totals.num_generated_tokens, totals.num_prefill_tokens
    return snap


class ServerMetrics:
    """The registry and instruments of one server; ``observe_*`` are called by the request handlers."""

    def __init__(self, model_name: str):
        prom = require("prometheus_client", "server metrics")
        self.registry = reg = prom.CollectorRegistry()
        labels = {"model_name": model_name}
        self._labels = labels

        def gauge(name, doc):
            return prom.Gauge(f"pagedkv:{name}", doc, list(labels), registry=reg).labels(**labels)

        def counter(name, doc):
            return prom.Counter(f"pagedkv:{name}", doc, list(labels), registry=reg).labels(**labels)

        def histogram(name, doc, buckets):
            return prom.Histogram(f"pagedkv:{name}", doc, list(labels), buckets=buckets, registry=reg).labels(**labels)

        self.num_running = gauge("num_requests_running", "Requests running in the engine")
        self.num_waiting = gauge("num_requests_waiting", "Requests waiting (engine queue and admission queue)")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV cache usage: 1 = every block used")
        self.kv_blocks = gauge("kv_num_blocks", "KV blocks in the pool")
        self.kv_free = gauge("kv_num_free_blocks", "KV blocks free (or cached and evictable)")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests")
        self.step_errors = counter("engine_step_errors", "Engine steps that raised")
        self.success = prom.Counter("pagedkv:request_success", "Finished requests by finish reason",
                                    [*labels, "finished_reason"], registry=reg)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, queued to finished", E2E_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Time queued before the first step",
                                    E2E_BUCKETS)
        self._prefix_seen = (0, 0)
        self._errors_seen = 0
        self._log_seen = (time.monotonic(), 0, 0)  # time, prompt tokens, generated tokens at the last log line

    # ------------------------------------------------------------------------------------ engine state
    def update(self, snap: EngineSnapshot, num_step_errors: int) -> None:
        """Gauges and engine-side counters from a snapshot (before each scrape and each log line)."""
        self.num_running.set(snap.num_running)
        self.num_waiting.set(snap.num_waiting)
        self.kv_usage.set(snap.kv_cache_usage)
        self.kv_blocks.set(snap.num_blocks)
        self.kv_free.set(snap.num_free_blocks)
        queries, hits = self._prefix_seen
        self.prefix_queries.inc(max(0, snap.prefix_query_tokens - queries))
        self.prefix_hits.inc(max(0, snap.prefix_hit_tokens - hits))
        self._prefix_seen = (max(queries, snap.prefix_query_tokens), max(hits, snap.prefix_hit_tokens))
        self.step_errors.inc(max(0, num_step_errors - self._errors_seen))
        self._errors_seen = max(self._errors_seen, num_step_errors)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    # ---------------------------------------------------------------------------------------- requests
    def observe_tokens(self, previous, output) -> None:
        """A new cumulative output of a request: inter-token latencies of the tokens it added."""
        t, t0 = output.metrics.last_token_time, None if previous is None else previous.metrics.last_token_time
        new = sum(len(c.token_ids) for c in output.outputs) - \
            (0 if previous is None else sum(len(c.token_ids) for c in previous.outputs))
        if t is None or t0 is None or new <= 0 or t <= t0:
            return
        gap = (t - t0) / new
        for _ in range(new):
            self.itl.observe(gap)

    def observe_finished(self, output, submit_time: float, end_time: float) -> None:
        """A request's final output: TTFT, queue time, end-to-end latency, tokens and its finish reasons."""
        m = output.metrics
        if m.first_token_time is not None:
            self.ttft.observe(max(0.0, m.first_token_time - submit_time))
        if m.first_scheduled_time is not None:
            self.queue_time.observe(max(0.0, m.first_scheduled_time - submit_time))
        self.e2e.observe(max(0.0, end_time - submit_time))
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(sum(len(c.token_ids) for c in output.outputs))
        for c in output.outputs:
            self.success.labels(**self._labels, finished_reason=c.finish_reason or "abort").inc()

    # ------------------------------------------------------------------------------------- the log line
    def log_line(self, snap: EngineSnapshot) -> str | None:
        """vLLM's periodic line (throughputs since the last line); None while the engine is idle."""
        now = time.monotonic()
        t0, prompt0, gen0 = self._log_seen
        self._log_seen = (now, snap.num_prompt_tokens, snap.num_generated_tokens)
        busy = snap.num_running or snap.num_waiting or snap.num_generated_tokens != gen0
        if not busy:
            return None
        dt = max(now - t0, 1e-9)
        hit = snap.prefix_hit_tokens / snap.prefix_query_tokens if snap.prefix_query_tokens else 0.0
        return (f"Avg prompt throughput: {(snap.num_prompt_tokens - prompt0) / dt:.1f} tokens/s, "
                f"Avg generation throughput: {(snap.num_generated_tokens - gen0) / dt:.1f} tokens/s, "
                f"Running: {snap.num_running} reqs, Waiting: {snap.num_waiting} reqs, "
                f"KV cache usage: {100 * snap.kv_cache_usage:.1f}%, Prefix cache hit rate: {100 * hit:.1f}%")
