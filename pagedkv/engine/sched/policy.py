"""Scheduling policies: which waiting requests start, where blocks come from, when finished ones let go.

``ContinuousPolicy`` (iteration-level batching, Orca/vLLM): requests join and leave the running batch at
every step; a missing block preempts the newest running request (by recompute).

``StaticPolicy`` reserves memory the way a dense ``[batch, max_len]`` KV tensor does (Hugging Face
``generate``, FasterTransformer): a batch is admitted in arrival order only when the previous one is over, and
every request of it holds ``prompt + max_tokens`` of the batch's longest request (``static_padding=True``, the
default), or only its own ``prompt + max_tokens`` (``static_padding=False``), from admission to the batch's end::

    padded     A [prompt | out ...... | pad ]      unpadded   A [prompt | out ...... ]
               B [prompt | out .. | pad ..... ]               B [prompt | out .. ]

The reservation is taken as raw blocks (``PagedAttentionManager.reserve``) and handed to the request's
sequences as they grow, so a static batch never preempts.

A policy is a small object with its own methods: it answers the scheduler's mode-specific questions from the
values it is given (the manager, the waiting queue, a request) and never drives the scheduler; the scheduler
owns the queues and runs the phases (:meth:`~pagedkv.engine.sched.scheduler.Scheduler.schedule`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...cache.manager import PagedAttentionManager
    from ..request import Request


class ContinuousPolicy:
    """Admit every step; a missing block preempts the newest running request; a finished branch frees at once."""

    admits_each_step = True
    preempts = True
    holds_finished = False

    def room(self, request: Request, num_blocks: int, manager: PagedAttentionManager) -> bool:
        """Whether ``num_blocks`` blocks can be allocated for ``request`` now."""
        return manager.can_allocate(num_blocks)


class StaticPolicy:
    """Admit a batch when the previous one is over, reserving its memory; never preempt; hold finished requests'
    blocks until the batch ends.

    Args:
        config: the scheduler's limits (``max_num_seqs``, ``enable_chunked_prefill``, ``static_padding``).
        block_size: tokens per block.
    """

    admits_each_step = False
    preempts = False
    holds_finished = True

    def __init__(self, config, block_size: int):
        self.config, self.block_size = config, block_size

    def room(self, request: Request, num_blocks: int, manager: PagedAttentionManager) -> bool:
        """Hand ``num_blocks`` of the request's reservation back to the pool, right before they are allocated."""
        manager.release_reserved(request.request_id, num_blocks)
        if not manager.can_allocate(num_blocks):
            raise RuntimeError(f"static reservation of request {request.request_id!r} is short of {num_blocks} "
                               f"blocks (a scheduler bug)")
        return True

    def next_batch(self, waiting, manager: PagedAttentionManager, budget: int) -> tuple[list, int]:
        """The longest prefix of the waiting queue whose reservation fits the free blocks (arrival order), and
        the batch's longest ``prompt + max_tokens``."""
        c = self.config
        batch, longest, seqs, tokens = [], 0, 0, 0
        for request in waiting:
            length = max(longest, request.max_len)
            if seqs + request.params.n > c.max_num_seqs:
                break
            if batch and not c.enable_chunked_prefill and tokens + request.prompt_len > budget:
                break
            if not manager.can_allocate(self.reserved_blocks(batch + [request], length)):
                break
            batch.append(request)
            longest, seqs, tokens = length, seqs + request.params.n, tokens + request.prompt_len
        return batch, longest

    def reserved_blocks(self, batch: list, longest: int) -> int:
        """Blocks a static batch reserves: every branch of every request at the batch's ``longest`` length
        (padded) or at its own maximum length (unpadded); a request's full prompt blocks are shared by its
        branches (each copies the partial one)."""
        total, bs = 0, self.block_size
        for r in batch:
            length = longest if self.config.static_padding else r.max_len
            shared_prompt_blocks = r.prompt_len // bs
            total += r.params.n * -(-length // bs) - (r.params.n - 1) * shared_prompt_blocks
        return total
