"""One step's plan as values: which tokens of which sequences the forward computes, who was preempted, and the
block ids the model runner needs (the new tables of changed sequences, the freed ones)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..request import Branch, Request


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
    """The step plan handed to the model runner (vLLM's ``SchedulerOutput``)::

        seqs            decodes first, then prefill chunks
        block_tables    {seq_id: block ids} of every sequence whose table changed since the last plan (new,
                        grown, forked, copied-on-write): the runner's persistent tables are updated from these
        freed_seq_ids   sequences freed since the last plan (their rows are given back)
    """

    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    budget: int = 0  # tokens left this step
    preempted_set: set = field(default_factory=set)
    block_tables: dict[int, list[int]] = field(default_factory=dict)
    freed_seq_ids: list[int] = field(default_factory=list)

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
