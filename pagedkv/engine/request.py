"""A request and its branches (sequences), and the outputs handed to callers."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..sampling_params import SamplingParams

FINISH_REASONS = ("stop", "length", "abort")
PLACEHOLDER = -1  # an output token sampled by a step still running on the device (its value comes at retire)


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
    request_id: int | str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_preemptions: int = 0
    prompt: str | None = None  # the prompt's text when it was given as text
    prompt_logprobs: list[dict[int, float] | None] | None = None  # None at position 0 (nothing predicts it)
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache (not computed)
    metrics: RequestMetrics = field(default_factory=RequestMetrics)


class Branch:
    """One of a request's ``n`` sampled continuations; ``seq_id`` is its manager sequence while it has one.

    ``num_computed`` tokens of ``prompt + output`` have K/V in the cache (or are being written by a step on the
    device); the rest are *pending* and are fed by the next steps (a whole or chunked prefill, then one token per
    decode step: the last sampled one). Positions are reserved in the manager ahead of what is computed
    (``num_reserved``, the sequence's context_len): exactly for prefill chunks, to the end of the block for
    decodes (one call per block)::

        block_size 4, tokens t0..t5 (t5 just sampled)     cache: [t0 t1 t2 t3][t4 .  .  . ]   num_computed 5
                                                          reserved to the block's end          num_reserved 8

    A token sampled by a step that is still running is a :data:`PLACEHOLDER` at the end of ``output_token_ids``
    (at most two: the step being retired and the one launched after it); ``sample_pos`` is where the newest
    one lies in the runner's device buffer of sampled tokens, from which the next step feeds it.
    ``done``: the scheduler gives the branch no more work (its last token is computed or in flight);
    ``finish_reason`` is set when that last token's value is known (an output, see :attr:`finished`).
    ``seed``: the sampler's 64-bit seed of this branch (None until the runner first needs one).
    """

    __slots__ = ("block_hashes", "detokenizer", "done", "finish_reason", "index", "logprobs", "cumulative_logprob",
                 "num_computed", "num_registered", "num_reserved", "output_token_ids", "sample_pos", "seed",
                 "seq_id", "stop_reason")

    def __init__(self, index: int, seed: int | None):
        self.index, self.seed, self.sample_pos, self.done = index, seed, -1, False
        self.output_token_ids: list[int] = []
        self.seq_id: int | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_computed = 0
        self.num_reserved = 0
        self.block_hashes: list[bytes] = []  # content hashes of full blocks of prompt + output (prefix caching)
        self.num_registered = 0  # blocks of the sequence named by their hash in the block manager
        self.logprobs: list[dict[int, float]] | None = None
        self.cumulative_logprob: float | None = None
        self.detokenizer = None  # made at the first token when the engine has a tokenizer

    @property
    def finished(self) -> bool:
        """The branch's output is final (its finish reason is known)."""
        return self.finish_reason is not None

    def num_known_outputs(self) -> int:
        """Output tokens whose value is known (the trailing placeholders excluded)."""
        ids = self.output_token_ids
        n = len(ids)
        while n and ids[n - 1] == PLACEHOLDER:
            n -= 1
        return n

    def drop_placeholders(self) -> None:
        """Forget tokens still in flight (the branch ended before them: they are never reported)."""
        del self.output_token_ids[self.num_known_outputs():]

    def forget_cache(self) -> None:
        """The branch lost its sequence (preempted): everything is pending again (its hashes stay valid)."""
        self.seq_id, self.num_computed, self.num_reserved, self.num_registered = None, 0, 0, 0


class Request:
    """A prompt, its sampling parameters and its branches, as the scheduler moves it between queues.

    Branches are made when the request is first admitted (``materialize``), so accepting a request costs O(1)
    in ``n``. Until its first token, only branch 0 computes: the prompt is prefilled once, and the other
    branches are forked from it (sharing every block) when the prompt's last logits are sampled.
    """

    def __init__(self, request_id, prompt_token_ids: list[int], params: SamplingParams, *, prompt: str | None = None,
                 arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.prompt = prompt
        self.params = params
        self.branches: list[Branch] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens taken from the prefix cache at the first admission
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.metrics = RequestMetrics(arrival_time=time.perf_counter() if arrival_time is None else arrival_time)
        self.aborted = False
        self.started = False  # a token was sampled: from then on every unfinished branch computes on its own

    def materialize(self) -> None:
        """Make the ``n`` branches (at first admission)."""
        if not self.branches:
            self.branches = [Branch(i, self.params.branch_seed(i)) for i in range(self.params.n)]
            if self.params.prompt_logprobs is not None:
                self.prompt_logprobs = [None]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def max_len(self) -> int:
        return len(self.prompt_token_ids) + self.params.max_tokens


    @property
    def finished(self) -> bool:
        """Every branch's output is final."""
        return bool(self.branches) and all(b.finished for b in self.branches)

    @property
    def done(self) -> bool:
        """The scheduler has no more work for any branch (the last tokens may still be in flight)."""
        return bool(self.branches) and all(b.done for b in self.branches)

    def active_branches(self) -> list[Branch]:
        """Branches the scheduler still gives work to."""
        return [b for b in self.branches if not b.done]

    def computing_branches(self) -> list[Branch]:
        """Branches that compute their own tokens: branch 0 alone until the first token, then every active one."""
        return self.active_branches() if self.started else self.branches[:1]

    def num_seqs(self) -> int:
        """Sequences the request runs at once: n before its first token, then its unfinished branches."""
        return len(self.active_branches()) if self.branches else self.params.n

    def num_tokens(self, branch: Branch) -> int:
        return len(self.prompt_token_ids) + len(branch.output_token_ids)

    def token_ids(self, branch: Branch) -> list[int]:
        return self.prompt_token_ids + branch.output_token_ids

    def token_slice(self, branch: Branch, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of ``prompt + output`` (no copy of the whole sequence)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return branch.output_token_ids[start - p:end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + branch.output_token_ids[:end - p]

    def output(self) -> RequestOutput:
        if self.branches:
            outs = [_completion(b) for b in self.branches]
        else:  # never admitted: n empty branches (aborted while waiting, or not yet run)
            reason = "abort" if self.aborted else None
            outs = [CompletionOutput(i, [], reason) for i in range(self.params.n)]
        return RequestOutput(self.request_id, list(self.prompt_token_ids), outs, self.finished or self.aborted,
                             self.num_preemptions, self.prompt,
                             None if self.prompt_logprobs is None else list(self.prompt_logprobs),
                             self.num_cached_tokens, RequestMetrics(*_fields(self.metrics)))


def _completion(b: Branch) -> CompletionOutput:
    text = b.detokenizer.text if b.detokenizer is not None else ""
    return CompletionOutput(b.index, b.output_token_ids[:b.num_known_outputs()], b.finish_reason, text,
                            None if b.logprobs is None else list(b.logprobs), b.cumulative_logprob, b.stop_reason)


def _fields(m: RequestMetrics) -> tuple:
    return m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time, m.finished_time
