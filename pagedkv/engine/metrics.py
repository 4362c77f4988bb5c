"""Engine metrics: one :class:`StepMetrics` per step (recorded on demand) and running totals."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sched.scheduler import Scheduler
    from .sched.step_plan import SchedulerOutput


@dataclass(slots=True)
class StepMetrics:
    """What one step did and how the KV pool looked after it (token-slot fields need ``record_steps``).

    ``num_token_slots_used`` counts filled slots of physical blocks (a shared block once);
    ``num_token_slots_reserved`` is ``num_used_blocks * block_size`` (static batching's reservations included).
    """

    step: int
    time_s: float  # since the engine's first step
    duration_s: float
    num_running: int  # sequences (branches) decoding or prefilled this step
    num_waiting: int  # requests
    num_prefill_tokens: int
    num_decode_tokens: int
    num_preempted: int
    num_used_blocks: int
    num_free_blocks: int
    num_token_slots_used: int = -1
    num_token_slots_reserved: int = -1
    utilization: float = float("nan")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class EngineMetrics:
    """Totals since the engine was built."""

    num_steps: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_generated_tokens: int = 0
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    num_preemptions: int = 0
    num_cow_copies: int = 0
    num_used_blocks: int = 0
    num_free_blocks: int = 0
    num_token_slots_used: int = 0  # filled at LLMEngine.metrics() from the pool
    num_token_slots_reserved: int = 0
    utilization: float = 1.0
    # prefix caching (filled at LLMEngine.metrics()): lookups of new sequences and what the cache held
    num_prefix_query_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    num_prefix_query_blocks: int = 0
    num_prefix_hit_blocks: int = 0
    num_cached_blocks: int = 0  # blocks carrying a hash now (used or evictable)
    num_evictable_blocks: int = 0
    num_evictions: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Share of looked-up tokens taken from the cache (0 before any lookup)."""
        return self.num_prefix_hit_tokens / self.num_prefix_query_tokens if self.num_prefix_query_tokens else 0.0

    @property
    def prefix_cache_block_hit_rate(self) -> float:
        return self.num_prefix_hit_blocks / self.num_prefix_query_blocks if self.num_prefix_query_blocks else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.num_prefill_tokens / self.prefill_time_s if self.prefill_time_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.num_decode_tokens / self.decode_time_s if self.decode_time_s else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(prefill_tokens_per_s=self.prefill_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s,
                 prefix_cache_hit_rate=self.prefix_cache_hit_rate,
                 prefix_cache_block_hit_rate=self.prefix_cache_block_hit_rate)
        return d


@dataclass(slots=True)
class StepTiming:
    """Host wall time of one ``step()`` call's phases (seconds), and the device time of the step it retired.

    ``schedule_s``, ``prepare_s`` (batch metadata into the input buffer), ``launch_s`` (enqueue the forward,
    sampling and copies) belong to the step launched by the call; ``wait_s`` is the host blocked on the device
    for the retired step's tokens; ``process_s`` fills its outputs. ``gpu_s``: the device time of the retired
    step (CUDA events around its copies, forward and sampling; None unless ``runner.record_gpu_time``).
    Host work the device overlapped = host time - exposed, where exposed = wall - gpu_s (the device idle).
    """

    schedule_s: float = 0.0
    prepare_s: float = 0.0
    launch_s: float = 0.0
    wait_s: float = 0.0
    process_s: float = 0.0
    gpu_s: float | None = None

    @property
    def host_s(self) -> float:
        return self.schedule_s + self.prepare_s + self.launch_s + self.process_s


def account_step(t: EngineMetrics, out: SchedulerOutput, duration_s: float) -> None:
    """Add one step's tokens and time to the totals."""
    t.num_steps += 1
    t.num_prefill_tokens += out.num_prefill_tokens
    t.num_decode_tokens += out.num_decode_tokens
    t.num_generated_tokens += out.num_sampled
    if out.has_prefill:  # NOTE: a mixed step is one forward: its time counts as prefill time
        t.prefill_time_s += duration_s
    else:
        t.decode_time_s += duration_s


def slot_usage(scheduler: Scheduler):
    """(pool usage, filled token slots): positions reserved ahead of what is computed are not filled."""
    usage = scheduler.manager.usage()
    ahead = sum(b.num_reserved - b.num_computed for r in (*scheduler.running, *scheduler.held)
                for b in r.branches if b.seq_id is not None)
    return usage, usage.num_token_slots_used - ahead


def step_metrics(scheduler: Scheduler, out: SchedulerOutput, step: int, time_s: float,
                 duration_s: float) -> StepMetrics:
    usage, used = slot_usage(scheduler)
    return StepMetrics(
        step=step, time_s=time_s, duration_s=duration_s,
        num_running=sum(len(r.active_branches()) for r in scheduler.running),
        num_waiting=len(scheduler.waiting), num_prefill_tokens=out.num_prefill_tokens,
        num_decode_tokens=out.num_decode_tokens, num_preempted=len(out.preempted),
        num_used_blocks=usage.num_used_blocks, num_free_blocks=usage.num_free_blocks,
        num_token_slots_used=used, num_token_slots_reserved=usage.num_token_slots_reserved,
        utilization=used / usage.num_token_slots_reserved if usage.num_token_slots_reserved else 1.0)


def account_prefix_cache(t: EngineMetrics, prefix_cache, cache_counts: dict) -> None:
    """Copy the prefix cache's lookup counts and the pool's cached / evictable / evicted blocks
    (``PagedAttentionManager.cache_counts()``)."""
    if prefix_cache is not None:
        p = prefix_cache.stats
        t.num_prefix_query_tokens, t.num_prefix_hit_tokens = p.num_query_tokens, p.num_hit_tokens
        t.num_prefix_query_blocks, t.num_prefix_hit_blocks = p.num_query_blocks, p.num_hit_blocks
    t.num_cached_blocks = cache_counts["num_cached_blocks"]
    t.num_evictable_blocks = cache_counts["num_evictable_blocks"]
    t.num_evictions = cache_counts["num_evictions"]
