"""Iteration-level scheduling on the paged KV cache: one token budget per step, shared by decodes and prefill
chunks; the continuous or static policy decides admission (:mod:`pagedkv.engine.sched.policy`).

One :meth:`Scheduler.schedule` is one engine step, in named phases::

    admit a batch    static: when a batch is over, release it and admit the next one (reserving its memory)
    decodes          one token for each running sequence with one pending, oldest request first
    prefill chunks   running requests' pending prompt (or recompute) tokens, within the budget left
    admit            continuous: waiting requests, while seats, blocks above the watermark and budget allow
    table changes    the new block tables of changed sequences and the freed ones, into the step plan

A missing block preempts the newest running request (continuous policy). With chunked prefill a prompt
longer than what is left of the budget is prefilled over several steps::

    max_num_batched_tokens = 12          step 1        step 2        step 3
    A, B, C decoding                     A B C         A B C         A B C
    D: a 20-token prompt                 D[0:9]        D[9:18]       D[18:20] ─► D samples its first token

A sequence's tokens are ``prompt + output``; ``num_computed`` of them are in the cache, the rest are pending
(a decode has exactly one pending: the last sampled token). Until a request's first token only branch 0
computes; its other branches fork from it (sharing every block) when the prompt's logits are sampled.

Preemption is by recompute: the request frees every block and goes to the *front* of the waiting queue; on
re-admission each unfinished branch prefills ``prompt + generated`` and continues.

Over 400 lines because one step's phases (admission in both modes, decodes, prefill chunks, preemption, forks,
the table changes of the plan) all move the queues it owns; the mode-specific decisions live in the policy.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from ...cache.manager import PagedAttentionManager
from .policy import ContinuousPolicy, StaticPolicy
from .prefix_cache import PrefixHit
from ..request import Branch, Request
from .step_plan import ScheduledSeq, SchedulerOutput

MODES = ("continuous", "static")


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    mode: str = "continuous"
    watermark: float = 0.01  # fraction of blocks kept free when admitting (continuous mode)
    static_padding: bool = True  # static mode: each request reserves the batch's longest prompt + max_tokens
    enable_chunked_prefill: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"scheduling must be one of {MODES}, got {self.mode!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_num_seqs="
                             f"{self.max_num_seqs} (every running sequence decodes one token per step)")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_model_len="
                             f"{self.max_model_len} without chunked prefill (a prompt is prefilled in one step)")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark!r}")


class Scheduler:
    """Owns the waiting queue and the running list; allocates through the manager.

    Args:
        config: limits and mode; manager: the paged KV cache's sequences and blocks.
    """

    def __init__(self, config: SchedulerConfig, manager: PagedAttentionManager, prefix_cache=None):
        self.config, self.manager = config, manager
        self.block_size = manager.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last is the newest
        self.held: list[Request] = []  # static: finished requests whose blocks wait for their batch's end
        self.num_preemptions = 0
        # sequences whose block table changed (new, grown, copied-on-write) / that were freed, since the model
        # runner last drained them (its persistent block tables are updated from these alone)
        self.changed_seq_ids: set[int] = set()
        self.freed_seq_ids: list[int] = []
        self.watermark_blocks = int(config.watermark * manager.num_blocks)
        self.policy = StaticPolicy(config, self.block_size) if config.mode == "static" else ContinuousPolicy()
        # NOTE: static batches reserve and compute everything (the dense-tensor baseline): no prefix cache
        self.prefix_cache = prefix_cache if config.mode == "continuous" else None

    # ------------------------------------------------------------------------------------ submission
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_fits(self, prompt_len: int, params) -> None:
        """Refuse (``ValueError``) a request that could never run; O(1), nothing changes."""
        c, n, max_len = self.config, params.n, prompt_len + params.max_tokens
        if n > c.max_num_seqs:
            raise ValueError(f"n={n} exceeds max_num_seqs={c.max_num_seqs}: its branches could never run at once")
        if max_len > c.max_model_len:
            raise ValueError(f"prompt ({prompt_len}) + max_tokens ({params.max_tokens}) = {max_len} exceeds "
                             f"max_model_len={c.max_model_len}")
        usable = self.manager.num_blocks - self.watermark_blocks
        if n * self.blocks_for(max_len) > usable:  # NOTE: nothing shared: branches recomputed after preemption
            raise ValueError(f"request needs up to {n * self.blocks_for(max_len)} blocks (n={n}, {max_len} tokens) "
                             f"but the pool has {usable} usable blocks")

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ----------------------------------------------------------------------------------------- step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(budget=self.config.max_num_batched_tokens)
        if not self.policy.admits_each_step:
            self._admit_batch(out)
        self._schedule_decodes(out)
        self._schedule_prefills(out)
        if self.policy.admits_each_step:
            self._admit(out)
        if out.seqs:
            out.block_tables, out.freed_seq_ids = self._drain_table_changes()
        return out

    def _admit_batch(self, out: SchedulerOutput) -> None:
        """Static: when no request runs, release the last batch and admit the next (its prefill runs this step)."""
        if self.running:
            return
        self.release_held()
        batch, longest = self.policy.next_batch(self.waiting, self.manager, out.budget)
        now = time.perf_counter()
        for request in batch:
            self.waiting.popleft()
            self.manager.reserve(request.request_id, self.policy.reserved_blocks([request], longest))
            self.start(request, now)

    def _admit(self, out: SchedulerOutput) -> None:
        """Continuous: waiting requests in order while seats, blocks (above the watermark) and the token budget
        allow. None is admitted in a step that preempted (the pool is short). A re-admitted request's branches
        that do not fit this step wait in the running list for the next steps' prefill phase."""
        if out.preempted or not self.waiting:
            return
        now, cache = time.perf_counter(), self.prefix_cache
        num_seqs = sum(r.num_seqs() for r in self.running)
        pending = cache.pending_hashes(self.running) if cache is not None else set()
        while self.waiting and out.budget > 0:
            request = self.waiting[0]
            if num_seqs + request.num_seqs() > self.config.max_num_seqs:
                break
            request.materialize()
            first = request.computing_branches()[0]
            start, size, hit = self.plan(request, first, out)
            if size == 0 or self.manager.num_free_blocks - self.blocks_to_start(start + size, hit) < \
                    self.watermark_blocks:
                break
            if pending and cache.waits_for(first, len(hit.block_ids), pending):
                break
            self.waiting.popleft()
            self.start(request, now)
            for branch in request.computing_branches():
                if not self.schedule_branch(request, branch, out, preempt=False):
                    break
            if cache is not None and not request.started:
                pending.update(first.block_hashes[first.num_registered:])
            num_seqs += request.num_seqs()

    def make_room(self, request: Request, num_blocks, out: SchedulerOutput, preempt: bool) -> bool:
        """Make ``num_blocks()`` blocks allocatable for ``request``: the policy's room (static: from its
        reservation), else preempt the newest running requests (continuous); False when it could not
        (``preempt`` off, or ``request`` itself was the newest). ``num_blocks`` is asked again after each
        preemption (a victim's blocks may be the cached ones ``request`` is about to take)."""
        while not self.policy.room(request, num_blocks(), self.manager):
            if not (preempt and self.policy.preempts and self.running):
                return False
            victim = self.running[-1]
            self.preempt(victim, out)
            if victim is request:
                return False
        return True

    def _schedule_decodes(self, out: SchedulerOutput) -> None:
        """One token for every sequence with one pending (the hot path: no lookup, a block at most)."""
        for request in list(self.running):
            if request in out.preempted_set:  # by an older request of this step
                continue
            started, prompt_len = request.started, request.prompt_len
            for branch in (request.active_branches() if started else request.branches[:1]):
                start = branch.num_computed
                if branch.seq_id is None or prompt_len + len(branch.output_token_ids) - start != 1:
                    continue
                if out.budget == 0:
                    return
                if start >= branch.num_reserved and not self._append(request, branch, start, start + 1, out, True):
                    break
                samples = [branch] if started else request.active_branches()
                out.seqs.append(ScheduledSeq(request, branch, start, 1, samples, started))
                out.budget -= 1

    def _schedule_prefills(self, out: SchedulerOutput) -> None:
        for request in list(self.running):
            if request in out.preempted_set:
                continue
            for branch in request.computing_branches():
                if branch.seq_id is not None and request.num_tokens(branch) - branch.num_computed <= 1:
                    continue  # decoded above
                done = self.schedule_branch(request, branch, out)
                if done is None:
                    return  # the budget is spent
                if not done:
                    break

    def chunk_size(self, pending: int, out: SchedulerOutput) -> int:
        """Tokens of a ``pending``-token prefill that this step can take (0: none).

        NOTE: without chunked prefill a prompt runs whole; the first prefill of a step may then exceed the
        budget by the step's decodes (at most ``max_num_seqs``), so that a long prompt never starves.
        """
        if self.config.enable_chunked_prefill:
            return min(pending, out.budget)
        return pending if pending <= out.budget or not out.has_prefill else 0

    def plan(self, request: Request, branch: Branch, out: SchedulerOutput) -> tuple[int, int, PrefixHit]:
        """``(start, size, prefix hit)`` of the branch's next chunk (size 0: no budget left). A branch without
        a sequence starts after the longest cached prefix of its tokens (prefix caching)."""
        hit = PrefixHit()
        if branch.seq_id is None and self.prefix_cache is not None:
            hit = self.prefix_cache.lookup(request, branch)
        start = hit.num_tokens(self.block_size) if branch.seq_id is None else branch.num_computed
        return start, self.chunk_size(request.num_tokens(branch) - start, out), hit

    def blocks_to_start(self, end: int, hit: PrefixHit) -> int:
        """How far the pool's free count drops when a sequence of ``end`` tokens starts from ``hit``."""
        return self.manager.num_blocks_to_add(end, cached_block_ids=hit.block_ids, copy_from=hit.copy_from)

    def schedule_branch(self, request: Request, branch: Branch, out: SchedulerOutput,
                        preempt: bool = True) -> bool | None:
        """Reserve the branch's next chunk and add it to ``out``. Returns None when the budget is spent, False
        when there was no room (without ``preempt``) or the request itself was preempted, else True."""
        start, size, hit = self.plan(request, branch, out)
        if size == 0:
            return None
        end = start + size
        if branch.seq_id is None:
            if not self.make_room(request, lambda: self.blocks_to_start(end, hit), out, preempt):
                return False
            self._start_sequence(branch, end, hit)
            branch.num_computed, branch.num_reserved = start, end
            if self.prefix_cache is not None:
                self.prefix_cache.started(request, branch, hit)
        elif not self._append(request, branch, start, end, out, preempt):
            return False
        samples = end == request.num_tokens(branch)
        sample_branches = (request.active_branches() if not request.started else [branch]) if samples else []
        is_decode = size == 1 and samples and start >= request.prompt_len
        out.add(ScheduledSeq(request, branch, start, size, sample_branches, is_decode))
        return True

    def _start_sequence(self, branch: Branch, end: int, hit: PrefixHit) -> None:
        """A new sequence of ``end`` positions on ``hit``'s cached blocks; a partly matching cached block is
        copied into its next block (held meanwhile, so that the allocation cannot evict it)."""
        branch.seq_id = self.manager.add_sequence(end, cached_block_ids=hit.block_ids, copy_from=hit.copy_from)
        self.changed_seq_ids.add(branch.seq_id)

    def _append(self, request: Request, branch: Branch, start: int, end: int, out, preempt: bool) -> bool:
        """Make positions ``[start, end)`` of the branch's sequence exist (appended slots).

        Prefill chunks reserve exactly; decodes of a started request reserve to the end of the block (one
        manager call per block). NOTE: a sequence that will be forked (a first prompt) never reserves ahead,
        so its children share only what was written and copy the partial block before their first write.
        """
        if end <= branch.num_reserved:
            return True
        target = (start // self.block_size + 1) * self.block_size if request.started and end - start == 1 else end
        count = target - branch.num_reserved
        if not self.make_room(request, lambda: self._blocks_to_append(branch, count), out, preempt):
            return False
        self.manager.append_slots(branch.seq_id, count)
        branch.num_reserved = target
        self.changed_seq_ids.add(branch.seq_id)
        return True

    def _blocks_to_append(self, branch: Branch, count: int) -> int:
        """Blocks ``append_slots(count)`` takes: new blocks, plus one copy-on-write of a shared partial block."""
        return self.manager.num_blocks_to_append(branch.seq_id, count)

    # ------------------------------------------------------------------------------- state changes
    def start(self, request: Request, now: float) -> None:
        """Admitted: make its branches, and it runs from now on."""
        request.materialize()
        if request.metrics.first_scheduled_time is None:
            request.metrics.first_scheduled_time = now
        self.running.append(request)

    def preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Free every block of ``request`` and queue it first: its branches recompute when re-admitted."""
        self.free_request(request)
        for b in request.branches:
            b.forget_cache()
        self.running.remove(request)
        self.waiting.appendleft(request)
        request.num_preemptions += 1
        self.num_preemptions += 1
        out.drop(request)

    def fork(self, request: Request) -> None:
        """The prompt of branch 0 is computed: the other branches share its blocks from now on."""
        first = request.branches[0]
        if first.num_reserved != first.num_computed:
            raise RuntimeError(f"branch 0 reserved {first.num_reserved} positions but computed {first.num_computed}")
        for b in request.branches[1:]:
            b.seq_id = self.manager.fork_sequence(first.seq_id)
            self.changed_seq_ids.add(b.seq_id)
            b.num_computed = b.num_reserved = first.num_computed
            if self.prefix_cache is not None:
                self.prefix_cache.fork(first, b)

    def computed(self, request: Request, branch: Branch, end: int) -> None:
        """A launched step writes the K/V of the branch's tokens up to ``end``: full blocks get their names."""
        branch.num_computed = end
        self.register(request, branch)

    def register(self, request: Request, branch: Branch) -> None:
        """Name the branch's computed full blocks whose tokens are all known (no placeholder among them).

        NOTE: a block may be named while the step writing it still runs: any step that reads it through the
        cache is launched later on the same stream, so it reads the written K/V.
        """
        if self.prefix_cache is None or branch.num_computed // self.block_size <= branch.num_registered or \
                branch.seq_id is None or branch.done:
            return
        known = request.prompt_len + branch.num_known_outputs()
        full = min(branch.num_computed, known) // self.block_size
        if full > branch.num_registered:
            self.prefix_cache.register(request, branch, full)

    def finish_branch(self, request: Request, branch: Branch) -> None:
        """A branch ends (no more work): its blocks are freed now (continuous) or when its batch ends (static)."""
        if branch.done:
            return
        branch.done = True
        if not self.policy.holds_finished:
            self.free_branch(branch)
        if not request.done:
            return
        if request in self.running:
            self.running.remove(request)
            self._request_finished(request)
        elif request in self.waiting:  # preempted while its last token was in flight
            self.waiting.remove(request)

    def abort(self, request: Request) -> None:
        """Drop a waiting or running request and free its blocks now."""
        for b in request.branches:
            b.done = True
        if request in self.running:
            self.running.remove(request)
            self.free_request(request)
            self._request_finished(request, aborted=True)
        elif request in self.waiting:
            self.waiting.remove(request)
            self.free_request(request)

    def free_request(self, request: Request) -> None:
        for b in request.branches:
            self.free_branch(b)
        self.manager.release_reserved(request.request_id)

    def free_branch(self, branch: Branch) -> None:
        """Free the branch's sequence (if it has one)."""
        if branch.seq_id is not None:
            self.manager.free_sequence(branch.seq_id)
            self.freed_seq_ids.append(branch.seq_id)
            branch.seq_id = None

    def free_orphans(self) -> None:
        """Free every sequence of the manager that no request holds (after a failure)."""
        live = self.live_seq_ids()
        for seq_id in self.manager.seq_ids:
            if seq_id not in live:
                self.manager.free_sequence(seq_id)
                self.freed_seq_ids.append(seq_id)

    def _request_finished(self, request: Request, aborted: bool = False) -> None:
        """Static: a finished request's blocks wait for its batch's end (released when no request runs)."""
        if self.policy.holds_finished:
            if not aborted:
                self.held.append(request)
            if not self.running:
                self.release_held()

    def _drain_table_changes(self) -> tuple[dict[int, list[int]], list[int]]:
        """({sequence: its block table} for the sequences whose table changed, sequences freed) since the last
        call: the block ids the model runner gets (it never reads the manager)."""
        changed, freed = self.changed_seq_ids, self.freed_seq_ids
        self.changed_seq_ids, self.freed_seq_ids = set(), []
        live = set(self.manager.seq_ids)
        return {i: self.manager.block_table(i) for i in changed if i in live}, freed

    def release_held(self) -> None:
        for request in self.held:
            self.free_request(request)
        self.held = []

    def live_seq_ids(self) -> set[int]:
        """Sequences the scheduler's requests hold (anything else in the manager is an orphan)."""
        return {b.seq_id for r in (*self.running, *self.held) for b in r.branches if b.seq_id is not None}
