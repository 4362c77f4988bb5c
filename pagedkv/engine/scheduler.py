"""Iteration-level scheduling on the paged KV cache: continuous batching with preemption, and static batching.

Each :meth:`Scheduler.schedule` is one engine step, in named phases::

    continuous:  reserve decode slots (preempt the newest request while a block is missing)
                 ─► admit waiting requests while blocks (above a watermark), max_num_seqs and
                    max_num_batched_tokens allow  (none if someone was preempted this step)
    static:      batch running ─► reserve decode slots from the batch's own reservation
                 batch finished ─► release it, admit the next batch in arrival order

Static batching reserves memory the way a dense ``[batch, max_len]`` KV tensor does (Hugging Face ``generate``,
FasterTransformer): every request of a batch holds ``prompt + max_tokens`` of the batch's longest request
(``static_padding=True``, the default), or only its own ``prompt + max_tokens`` (``static_padding=False``)::

    padded     A [prompt | out ...... | pad ]      unpadded   A [prompt | out ...... ]
               B [prompt | out .. | pad ..... ]               B [prompt | out .. ]

Preemption is by recompute: the newest running request frees all its blocks and goes to the *front* of the
waiting queue; on re-admission each unfinished branch prefills ``prompt + generated`` and continues.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..manager import PagedAttentionManager
from .request import Branch, Request

MODES = ("continuous", "static")


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    mode: str = "continuous"
    watermark: float = 0.01  # fraction of blocks kept free when admitting (continuous mode)
    static_padding: bool = True  # static mode: each request reserves the batch's longest prompt + max_tokens

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"max_model_len={self.max_model_len} (a whole sequence must fit one prefill)")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark!r}")


@dataclass(slots=True)
class PrefillWork:
    """Prefill ``token_ids`` into ``branches[0]``'s sequence; every branch samples from its last logits."""

    request: Request
    branches: list[Branch]
    token_ids: list[int]


@dataclass(slots=True)
class SchedulerOutput:
    prefills: list[PrefillWork] = field(default_factory=list)
    decodes: list[tuple[Request, Branch]] = field(default_factory=list)  # one slot appended to each
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(len(w.token_ids) for w in self.prefills)


class Scheduler:
    """Owns the waiting queue and the running list; allocates through the manager.

    Args:
        config: limits and mode; manager: the paged KV cache's sequences and blocks.
    """

    def __init__(self, config: SchedulerConfig, manager: PagedAttentionManager):
        self.config, self.manager = config, manager
        self.block_size = manager.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last is the newest
        self.num_preemptions = 0
        # static mode: a finished request's sequences and reserved blocks are freed when its batch ends
        self._held_seq_ids: list[int] = []
        self._held_block_ids: list[int] = []
        self.watermark_blocks = int(config.watermark * manager.block_manager.num_blocks)

    # ------------------------------------------------------------------------------------ submission
    def max_blocks(self, request: Request) -> int:
        """Blocks a request may need at once: every branch at its maximum length, nothing shared."""
        return request.params.n * -(-request.max_len // self.block_size)

    def check_fits(self, request: Request) -> None:
        """Refuse (``ValueError``) a request that could never run; nothing changes."""
        if request.max_len > self.config.max_model_len:
            raise ValueError(f"prompt ({len(request.prompt_token_ids)}) + max_tokens ({request.params.max_tokens}) "
                             f"= {request.max_len} exceeds max_model_len={self.config.max_model_len}")
        usable = self.manager.block_manager.num_blocks - self.watermark_blocks
        if self.max_blocks(request) > usable:
            raise ValueError(f"request needs up to {self.max_blocks(request)} blocks (n={request.params.n}, "
                             f"{request.max_len} tokens) but the pool has {usable} usable blocks")

    def add(self, request: Request) -> None:
        self.check_fits(request)
        self.waiting.append(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ----------------------------------------------------------------------------------------- step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.config.mode == "static":
            self._schedule_static(out)
        else:
            self._reserve_decode_slots(out)
            if not out.preempted:
                self._admit(out)
        return out

    def _schedule_static(self, out: SchedulerOutput) -> None:
        if self.running:
            self._reserve_decode_slots(out)
            return
        self._release_held()
        self._admit(out)

    # ----------------------------------------------------------------------------------- decode slots
    def _reserve_decode_slots(self, out: SchedulerOutput) -> None:
        for request in list(self.running):
            if request not in out.preempted:  # not preempted by an older request of this step
                self._append_slots(request, out)

    def _append_slots(self, request: Request, out: SchedulerOutput) -> None:
        """Reserve the position each branch writes this step; the manager is asked once per block."""
        for branch in request.active_branches():
            position = len(request.prompt_token_ids) + len(branch.output_token_ids) - 1
            if position >= branch.num_reserved:
                count = self.block_size - position % self.block_size  # to the end of the block
                if request.reserved_block_ids and self._needs_block(branch.seq_id):
                    self.manager.block_manager.free([request.reserved_block_ids.pop()])
                # NOTE: reserving to a block's end takes at most one block (a boundary or a copy-on-write)
                while self.manager.block_manager.num_free_blocks == 0 and \
                        not self.manager.can_append(branch.seq_id, count):
                    victim = self.running[-1]
                    self._preempt(victim, out)
                    if victim is request:
                        return
                self.manager.append_slots(branch.seq_id, count)
                branch.num_reserved += count
            out.decodes.append((request, branch))

    def _needs_block(self, seq_id: int) -> bool:
        """Whether appending one token takes a block (a block boundary, or copy-on-write of a shared block)."""
        table = self.manager.block_table(seq_id)
        return self.manager.context_len(seq_id) % self.block_size == 0 or \
            self.manager.block_manager.ref_count(table[-1]) > 1

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        assert self.config.mode == "continuous", "static batches reserve their memory and never preempt"
        self._free_request(request)
        self.running.remove(request)
        self.waiting.appendleft(request)
        request.num_preemptions += 1
        self.num_preemptions += 1
        out.decodes = [(r, b) for r, b in out.decodes if r is not request]
        out.preempted.append(request)

    # ---------------------------------------------------------------------------------------- admission
    def _admit(self, out: SchedulerOutput) -> None:
        if self.config.mode == "static":
            self._admit_static_batch(out)
            return
        num_seqs = sum(len(r.active_branches()) for r in self.running)
        num_tokens = len(out.decodes)
        while self.waiting:
            blocks, tokens, seqs = self._admission_cost(self.waiting[0])
            if num_seqs + seqs > self.config.max_num_seqs:
                break
            if num_tokens + tokens > self.config.max_num_batched_tokens and out.prefills:
                break
            if self.manager.block_manager.num_free_blocks - blocks < self.watermark_blocks:
                break
            self._start(self.waiting.popleft(), out)
            num_seqs, num_tokens = num_seqs + seqs, num_tokens + tokens

    def _admit_static_batch(self, out: SchedulerOutput) -> None:
        """The longest prefix of the waiting queue whose reservation fits the free blocks (arrival order)."""
        batch, longest = [], 0
        for request in self.waiting:
            candidate, length = batch + [request], max(longest, request.max_len)
            if len(candidate) > self.config.max_num_seqs or (
                    batch and sum(len(r.prompt_token_ids) for r in candidate) > self.config.max_num_batched_tokens):
                break
            if not self.manager.block_manager.can_allocate(self._static_blocks(candidate, length)):
                break
            batch, longest = candidate, length
        for request in batch:
            self.waiting.popleft()
            self._start(request, out, longest)

    def _static_blocks(self, batch: list[Request], longest: int) -> int:
        """Blocks a static batch reserves: every branch of every request at the batch's ``longest`` length
        (padded) or at its own maximum length (unpadded); a request's prompt blocks are shared by its branches."""
        total = 0
        for r in batch:
            length = longest if self.config.static_padding else r.max_len
            shared_prompt_blocks = len(r.prompt_token_ids) // self.block_size
            total += r.params.n * -(-length // self.block_size) - (r.params.n - 1) * shared_prompt_blocks
        return total

    def _admission_cost(self, request: Request) -> tuple[int, int, int]:
        """(blocks, prefill tokens, sequences) to admit a request now (continuous mode)."""
        branches = request.active_branches()
        if not request.started:
            return -(-len(request.prompt_token_ids) // self.block_size), len(request.prompt_token_ids), len(branches)
        lens = [len(request.token_ids(b)) for b in branches]
        return sum(-(-n // self.block_size) for n in lens), sum(lens), len(branches)

    def _start(self, request: Request, out: SchedulerOutput, static_longest: int = 0) -> None:
        """Allocate a request's sequences; fresh branches fork the prompt's blocks (shared, ref count n).

        Static mode also reserves, up front, what :meth:`_static_blocks` says for a batch whose longest
        request is ``static_longest`` tokens.
        """
        branches = request.active_branches()
        if request.started:  # resumed after preemption: recompute each branch on its own
            for b in branches:
                tokens = request.token_ids(b)
                b.seq_id, b.num_reserved = self.manager.add_sequence(len(tokens)), len(tokens)
                out.prefills.append(PrefillWork(request, [b], tokens))
        else:
            first = branches[0]
            first.seq_id = self.manager.add_sequence(len(request.prompt_token_ids))
            for b in branches[1:]:
                b.seq_id = self.manager.fork_sequence(first.seq_id)
            for b in branches:
                b.num_reserved = len(request.prompt_token_ids)
            out.prefills.append(PrefillWork(request, branches, list(request.prompt_token_ids)))
        if self.config.mode == "static":
            used = -(-len(request.prompt_token_ids) // self.block_size)
            request.reserved_block_ids = self.manager.block_manager.allocate(
                self._static_blocks([request], static_longest) - used)
        self.running.append(request)

    # ------------------------------------------------------------------------------------------ finish
    def finish_branch(self, request: Request, branch: Branch) -> None:
        """A branch finished: free its blocks now (continuous) or when its batch ends (static)."""
        if self.config.mode == "static":
            self._held_seq_ids.append(branch.seq_id)
        else:
            self.manager.free_sequence(branch.seq_id)
        branch.seq_id = None
        if request.finished:
            self.running.remove(request)
            self._held_block_ids.extend(request.reserved_block_ids)
            request.reserved_block_ids = []
        if not self.running:
            self._release_held()  # static: the batch is over

    def _release_held(self) -> None:
        for seq_id in self._held_seq_ids:
            self.manager.free_sequence(seq_id)
        if self._held_block_ids:
            self.manager.block_manager.free(self._held_block_ids)
        self._held_seq_ids, self._held_block_ids = [], []

    def _free_reserved(self, request: Request) -> None:
        if request.reserved_block_ids:
            self.manager.block_manager.free(request.reserved_block_ids)
            request.reserved_block_ids = []

    def _free_request(self, request: Request) -> None:
        for b in request.branches:
            if b.seq_id is not None:
                self.manager.free_sequence(b.seq_id)
                b.seq_id = None
        self._free_reserved(request)
