"""Iteration-level scheduling on the paged KV cache: one token budget per step, shared by decodes and prefill
chunks; the continuous or static policy decides admission (:mod:`pagedkv.engine.policy`).

One :meth:`Scheduler.schedule` is one engine step, in named phases::

    policy.begin     static: when a batch is over, release it and admit the next one (reserving its memory)
    decodes          one token for each running sequence with one pending, oldest request first
    prefill chunks   running requests' pending prompt (or recompute) tokens, within the budget left
    policy.admit     continuous: waiting requests, while seats, blocks above the watermark and budget allow

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
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..manager import PagedAttentionManager
from .policy import ContinuousPolicy, StaticPolicy
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


@dataclass(slots=True)
class ScheduledSeq:
    """Feed ``num_tokens`` tokens of ``branch`` from position ``start``; ``sample_branches`` (empty mid-prompt)
    each sample one token from the last token's logits (all ``n`` branches for a request's first token)."""

    request: Request
    branch: Branch
    start: int
    num_tokens: int
    sample_branches: list[Branch]
    is_decode: bool = False  # one generated token fed back (prompt and recompute tokens are prefill)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    def token_ids(self) -> list[int]:
        return self.request.token_slice(self.branch, self.start, self.end)


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)  # decodes first, then prefill chunks
    preempted: list[Request] = field(default_factory=list)
    budget: int = 0  # tokens left this step
    preempted_set: set = field(default_factory=set)

    def add(self, seq: ScheduledSeq) -> None:
        self.seqs.append(seq)
        self.budget = max(self.budget - seq.num_tokens, 0)

    def drop(self, request: Request) -> None:
        """Remove a preempted request's work (its tokens return to the budget)."""
        kept = [s for s in self.seqs if s.request is not request]
        self.budget += sum(s.num_tokens for s in self.seqs) - sum(s.num_tokens for s in kept)
        self.seqs = kept
        self.preempted.append(request)
        self.preempted_set.add(request)

    @property
    def has_prefill(self) -> bool:
        return any(not s.is_decode for s in self.seqs)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs if not s.is_decode)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for s in self.seqs if s.is_decode)

    @property
    def num_sampled(self) -> int:
        return sum(len(s.sample_branches) for s in self.seqs)


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
        self.held: list[Request] = []  # static: finished requests whose blocks wait for their batch's end
        self.num_preemptions = 0
        self.watermark_blocks = int(config.watermark * manager.block_manager.num_blocks)
        self.policy = StaticPolicy(self) if config.mode == "static" else ContinuousPolicy(self)

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
        usable = self.manager.block_manager.num_blocks - self.watermark_blocks
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
        self.policy.begin(out)
        self._schedule_decodes(out)
        self._schedule_prefills(out)
        self.policy.admit(out)
        return out

    def _schedule_decodes(self, out: SchedulerOutput) -> None:
        for request in list(self.running):
            if request in out.preempted_set:  # by an older request of this step
                continue
            for branch in request.computing_branches():
                if branch.seq_id is not None and request.num_tokens(branch) - branch.num_computed == 1:
                    if not self.schedule_chunk(request, branch, 1, out):
                        break

    def _schedule_prefills(self, out: SchedulerOutput) -> None:
        for request in list(self.running):
            if request in out.preempted_set:
                continue
            for branch in request.computing_branches():
                pending = request.num_tokens(branch) - branch.num_computed
                if branch.seq_id is not None and pending <= 1:
                    continue  # decoded above
                size = self.chunk_size(pending, out)
                if size == 0:
                    return
                if not self.schedule_chunk(request, branch, size, out):
                    break

    def chunk_size(self, pending: int, out: SchedulerOutput) -> int:
        """Tokens of a ``pending``-token prefill that this step can take (0: none).

        NOTE: without chunked prefill a prompt runs whole; the first prefill of a step may then exceed the
        budget by the step's decodes (at most ``max_num_seqs``), so that a long prompt never starves.
        """
        if self.config.enable_chunked_prefill:
            return min(pending, out.budget)
        return pending if pending <= out.budget or not out.has_prefill else 0

    def schedule_chunk(self, request: Request, branch: Branch, size: int, out: SchedulerOutput,
                       preempt: bool = True) -> bool:
        """Reserve slots for ``size`` tokens of ``branch`` and add them to ``out``; False if it could not (no
        room without ``preempt``, or the request itself was preempted)."""
        start, end = branch.num_computed, branch.num_computed + size
        if not self._reserve(request, branch, start, end, out, preempt):
            return False
        samples = end == request.num_tokens(branch)
        sample_branches = (request.active_branches() if not request.started else [branch]) if samples else []
        is_decode = size == 1 and samples and start >= request.prompt_len
        out.add(ScheduledSeq(request, branch, start, size, sample_branches, is_decode))
        return True

    def _reserve(self, request: Request, branch: Branch, start: int, end: int, out, preempt: bool) -> bool:
        """Make positions ``[start, end)`` of the branch's sequence exist (a new sequence, or appended slots).

        Prefill chunks reserve exactly; decodes of a started request reserve to the end of the block (one
        manager call per block). NOTE: a sequence that will be forked (a first prompt) never reserves ahead,
        so its children share only what was written and copy the partial block before their first write.
        """
        if branch.seq_id is None:
            if not self.policy.make_room(request, self.blocks_for(end), out, preempt):
                return False
            branch.seq_id, branch.num_reserved = self.manager.add_sequence(end), end
            return True
        if end <= branch.num_reserved:
            return True
        target = (start // self.block_size + 1) * self.block_size if request.started and end - start == 1 else end
        count = target - branch.num_reserved
        if not self.policy.make_room(request, self._blocks_to_append(branch, count), out, preempt):
            return False
        self.manager.append_slots(branch.seq_id, count)
        branch.num_reserved = target
        return True

    def _blocks_to_append(self, branch: Branch, count: int) -> int:
        """Blocks ``append_slots(count)`` takes: new blocks, plus one copy-on-write of a shared partial block."""
        reserved = branch.num_reserved
        grow = self.blocks_for(reserved + count) - self.blocks_for(reserved)
        if reserved % self.block_size == 0:
            return grow
        last = self.manager.block_table(branch.seq_id)[-1]  # NOTE: only at the first decode after a prefill
        return grow + int(self.manager.block_manager.ref_count(last) > 1)

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
            b.num_computed = b.num_reserved = first.num_computed

    def finish_branch(self, request: Request, branch: Branch) -> None:
        """A branch ended: its blocks are freed now (continuous) or when its batch ends (static)."""
        self.policy.on_branch_finished(branch)
        if request.finished:
            self.running.remove(request)
            self.policy.on_request_finished(request)

    def abort(self, request: Request) -> None:
        """Drop a waiting or running request and free its blocks now."""
        if request in self.running:
            self.running.remove(request)
            self.free_request(request)
            self.policy.on_request_finished(request, aborted=True)
        elif request in self.waiting:
            self.waiting.remove(request)

    def free_request(self, request: Request) -> None:
        for b in request.branches:
            if b.seq_id is not None:
                self.manager.free_sequence(b.seq_id)
                b.seq_id = None
        if request.reserved_block_ids:
            self.manager.block_manager.free(request.reserved_block_ids)
            request.reserved_block_ids = []

    def release_held(self) -> None:
        for request in self.held:
            self.free_request(request)
        self.held = []

    def live_seq_ids(self) -> set[int]:
        """Sequences the scheduler's requests hold (anything else in the manager is an orphan)."""
        return {b.seq_id for r in (*self.running, *self.held) for b in r.branches if b.seq_id is not None}
