"""A request and its branches (sequences), and the outputs handed to callers."""
from __future__ import annotations

from dataclasses import dataclass

from .sampling import SamplingParams


@dataclass(slots=True)
class CompletionOutput:
    index: int  # branch number in [0, n)
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop" (EOS or a stop token) or "length"


@dataclass(slots=True)
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_preemptions: int = 0


class Branch:
    """One of a request's ``n`` sampled continuations; ``seq_id`` is its manager sequence while it runs.

    While running, the cache holds K/V for every token but the last sampled one (fed by the next step).
    Positions are reserved in the manager up to the end of the last block (one call per block, not per
    token)::

        block_size 4, tokens t0..t5 (t5 just sampled)     reserved: [t0 t1 t2 t3][t4 t5 .  . ]  num_reserved 8
    """

    __slots__ = ("finish_reason", "index", "num_reserved", "output_token_ids", "rng", "seq_id")

    def __init__(self, index: int, rng):
        self.index, self.rng = index, rng
        self.output_token_ids: list[int] = []
        self.seq_id: int | None = None
        self.finish_reason: str | None = None
        self.num_reserved = 0  # positions reserved in the manager (its context_len), up to a block's end

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Request:
    """A prompt, its sampling parameters and its branches, as the scheduler moves it between queues."""

    def __init__(self, request_id: int, prompt_token_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.branches = [Branch(i, rng) for i, rng in enumerate(params.rngs())]
        self.num_preemptions = 0
        self.reserved_block_ids: list[int] = []  # static batching: blocks held for future tokens

    @property
    def max_len(self) -> int:
        return len(self.prompt_token_ids) + self.params.max_tokens

    @property
    def started(self) -> bool:
        """True once a token was generated (a preempted request resumes by recomputing its tokens)."""
        return any(b.output_token_ids for b in self.branches)

    @property
    def finished(self) -> bool:
        return all(b.finished for b in self.branches)

    def active_branches(self) -> list[Branch]:
        return [b for b in self.branches if not b.finished]

    def token_ids(self, branch: Branch) -> list[int]:
        return self.prompt_token_ids + branch.output_token_ids

    def output(self) -> RequestOutput:
        outs = [CompletionOutput(b.index, list(b.output_token_ids), b.finish_reason) for b in self.branches]
        return RequestOutput(self.request_id, list(self.prompt_token_ids), outs, self.finished, self.num_preemptions)
