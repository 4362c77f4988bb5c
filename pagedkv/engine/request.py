"""A request and its branches (sequences), and the outputs handed to callers."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .sampling import SamplingParams

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(slots=True)
class CompletionOutput:
    """One branch's output so far (cumulative: ``token_ids`` and ``text`` only grow while it runs).

    ``logprobs[i]`` maps token ids to log-probabilities at generated position ``i``: the sampled token and the
    ``SamplingParams.logprobs`` most likely ones. ``stop_reason`` is the stop token id or stop string that ended
    the branch (None for EOS, length or abort).
    """

    index: int  # branch number in [0, n)
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop" (EOS, a stop token or string), "length" or "abort"
    text: str = ""  # detokenized output (needs a tokenizer on the engine); a stop string is cut from it
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (``time.perf_counter`` seconds) of a request's life in the engine."""

    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_preemptions: int = 0
    prompt: str | None = None  # the prompt's text when it was given as text
    prompt_logprobs: list[dict[int, float] | None] | None = None  # None at position 0 (nothing predicts it)
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache (not computed)
    metrics: RequestMetrics = field(default_factory=RequestMetrics)


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
        self.branches = [Branch(i, np.random.default_rng(params.branch_seed(i))) for i in range(params.n)]
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
