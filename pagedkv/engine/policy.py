"""Scheduling policies: which waiting requests start, where blocks come from, when finished ones let go.

``ContinuousPolicy`` (iteration-level batching, Orca/vLLM): requests join and leave the running batch at
every step; a missing block preempts the newest running request (by recompute).

``StaticPolicy`` reserves memory the way a dense ``[batch, max_len]`` KV tensor does (Hugging Face
``generate``, FasterTransformer): a batch is admitted in arrival order only when the previous one is over, and
every request of it holds ``prompt + max_tokens`` of the batch's longest request (``static_padding=True``, the
default), or only its own ``prompt + max_tokens`` (``static_padding=False``), from admission to the batch's end::

    padded     A [prompt | out ...... | pad ]      unpadded   A [prompt | out ...... ]
               B [prompt | out .. | pad ..... ]               B [prompt | out .. ]

The reservation is taken as raw blocks and handed to the request's sequences as they grow, so a static batch
never preempts.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .request import Branch, Request
    from .scheduler import Scheduler
    from .step_plan import SchedulerOutput


class ContinuousPolicy:
    def __init__(self, scheduler: Scheduler):
        self.s = scheduler

    def begin(self, out: SchedulerOutput) -> None:
        pass

    def admit(self, out: SchedulerOutput) -> None:
        """Waiting requests in order while seats, blocks (above the watermark) and the token budget allow.

        None is admitted in a step that preempted (the pool is short). A re-admitted request's branches that
        do not fit this step wait in the running list for the next steps' prefill phase.
        """
        s = self.s
        if out.preempted or not s.waiting:
            return
        now, cache = time.perf_counter(), s.prefix_cache
        num_seqs = sum(r.num_seqs() for r in s.running)
        pending = cache.pending_hashes(s.running) if cache is not None else set()
        while s.waiting and out.budget > 0:
            request = s.waiting[0]
            if num_seqs + request.num_seqs() > s.config.max_num_seqs:
                break
            request.materialize()
            first = request.computing_branches()[0]
            start, size, hit = s.plan(request, first, out)
            if size == 0 or s.manager.num_free_blocks - s.blocks_to_start(start + size, hit) < s.watermark_blocks:
                break
            if pending and cache.waits_for(first, len(hit.block_ids), pending):
                break
            s.waiting.popleft()
            s.start(request, now)
            for branch in request.computing_branches():
                if not s.schedule_branch(request, branch, out, preempt=False):
                    break
            if cache is not None and not request.started:
                pending.update(first.block_hashes[first.num_registered:])
            num_seqs += request.num_seqs()

    def make_room(self, request: Request, num_blocks, out: SchedulerOutput, preempt: bool) -> bool:
        """Free ``num_blocks()`` blocks for ``request`` by preempting the newest running requests; False when
        it could not (``preempt`` off, or ``request`` itself was the newest). ``num_blocks`` is asked again
        after each preemption (a victim's blocks may be the cached ones ``request`` is about to take)."""
        s = self.s
        while not s.manager.can_allocate(num_blocks()):
            if not preempt or not s.running:
                return False
            victim = s.running[-1]
            s.preempt(victim, out)
            if victim is request:
                return False
        return True

    def on_branch_finished(self, branch: Branch) -> None:
        self.s.free_branch(branch)

    def on_request_finished(self, request: Request, aborted: bool = False) -> None:
        pass


class StaticPolicy:
    def __init__(self, scheduler: Scheduler):
        self.s = scheduler

    def begin(self, out: SchedulerOutput) -> None:
        """When no request runs: release the last batch and admit the next (its prefill runs this step)."""
        s = self.s
        if s.running:
            return
        s.release_held()
        batch, longest = self._next_batch(out)
        now = time.perf_counter()
        for request in batch:
            s.waiting.popleft()
            s.manager.reserve(request.request_id, self.reserved_blocks([request], longest))
            s.start(request, now)

    def _next_batch(self, out: SchedulerOutput) -> tuple[list, int]:
        """The longest prefix of the waiting queue whose reservation fits the free blocks (arrival order)."""
        s, c = self.s, self.s.config
        batch, longest, seqs, tokens = [], 0, 0, 0
        for request in s.waiting:
            length = max(longest, request.max_len)
            if seqs + request.params.n > c.max_num_seqs:
                break
            if batch and not c.enable_chunked_prefill and tokens + request.prompt_len > out.budget:
                break
            if not s.manager.can_allocate(self.reserved_blocks(batch + [request], length)):
                break
            batch.append(request)
            longest, seqs, tokens = length, seqs + request.params.n, tokens + request.prompt_len
        return batch, longest

    def reserved_blocks(self, batch: list, longest: int) -> int:
        """Blocks a static batch reserves: every branch of every request at the batch's ``longest`` length
        (padded) or at its own maximum length (unpadded); a request's full prompt blocks are shared by its
        branches (each copies the partial one)."""
        s, total = self.s, 0
        for r in batch:
            length = longest if s.config.static_padding else r.max_len
            shared_prompt_blocks = r.prompt_len // s.block_size
            total += r.params.n * s.blocks_for(length) - (r.params.n - 1) * shared_prompt_blocks
        return total

    def admit(self, out: SchedulerOutput) -> None:
        pass  # a batch is admitted in begin(), when the previous one is over

    def make_room(self, request: Request, num_blocks, out: SchedulerOutput, preempt: bool) -> bool:
        """Hand ``num_blocks()`` of the request's reservation back to the pool, right before they are allocated."""
        num_blocks, manager = num_blocks(), self.s.manager
        manager.release_reserved(request.request_id, num_blocks)
        if not manager.can_allocate(num_blocks):
            raise RuntimeError(f"static reservation of request {request.request_id!r} is short of {num_blocks} "
                               f"blocks (a scheduler bug)")
        return True

    def on_branch_finished(self, branch: Branch) -> None:
        pass  # its blocks stay reserved until the batch ends

    def on_request_finished(self, request: Request, aborted: bool = False) -> None:
        s = self.s
        if not aborted:
            s.held.append(request)
        if not s.running:
            s.release_held()  # the batch is over
