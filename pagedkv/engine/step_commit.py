"""What a launched step does to its requests: committed at launch, retired when its tokens are back.

    commit (launch N)     positions [start, end) count as computed (blocks whose tokens are all known get their
                          prefix-cache names); a request's first tokens fork its ``n > 1`` branches; every token
                          being sampled becomes a placeholder; a branch that this token certainly ends
                          (``max_tokens``) is noted — its end holds for the scheduler before step N + 1 is scheduled
    retire (tokens of N)  placeholders get their values (stop rules, logprobs, text); a value-dependent end (EOS,
                          stop token or string) finishes the branch now; tokens of ended or aborted branches are
                          dropped
    catch up              blocks completed by the step launched after N, whose last token was N's, get their names

With synchronous scheduling the three run back to back; with asynchronous scheduling step N + 1 is committed
between commit and retire of step N (see :mod:`pagedkv.engine.engine`).
"""
from __future__ import annotations

from .runner.model_runner import InFlight, StepResult
from .output_processor import OutputProcessor
from .sched.scheduler import Scheduler


def commit(flight: InFlight, scheduler: Scheduler, outputs: OutputProcessor) -> None:
    """The step is on its way (see the module docstring); fills ``flight.samples`` and ``flight.endings``."""
    for s, positions in zip(flight.out.seqs, flight.positions):
        scheduler.computed(s.request, s.branch, s.end)
        if not s.sample_branches:
            continue
        if not s.request.started and s.request.params.n > 1:
            scheduler.fork(s.request)
        for branch, pos in zip(s.sample_branches, positions):
            branch.sample_pos = pos
            flight.samples.append((s.request, branch, len(branch.output_token_ids), pos))
            if outputs.place(s.request, branch):
                flight.endings.append((s.request, branch))


def apply_endings(flight: InFlight, scheduler: Scheduler) -> None:
    """Branches whose last token is in ``flight`` get no more work (their blocks are freed now)."""
    for request, branch in flight.endings:
        if not request.aborted:
            scheduler.finish_branch(request, branch)
    flight.endings = []


def retire(flight: InFlight, result: StepResult, scheduler: Scheduler, outputs: OutputProcessor,
           now: float) -> dict:
    """Fill the step's tokens in; returns the requests they advanced (request id -> request)."""
    advanced = {}
    for request, position, entries in result.prompt_logprobs:
        if not request.aborted and len(request.prompt_logprobs) == position:
            request.prompt_logprobs.append(entries)
    tokens, logprobs = result.tokens.tolist(), result.logprobs
    for request, branch, index, pos in flight.samples:
        if request.aborted:
            continue
        ended = outputs.fill(request, branch, index, tokens[pos], logprobs.get(pos), now)
        if ended is None:
            continue
        advanced[request.request_id] = request
        if ended:
            scheduler.finish_branch(request, branch)
    return advanced


def catch_up(flight: InFlight, scheduler: Scheduler) -> None:
    """Name the blocks of ``flight``'s sequences whose last token value arrived with the step before it."""
    for s in flight.out.seqs:
        scheduler.register(s.request, s.branch)


def live(flight: InFlight | None) -> bool:
    """True when retiring ``flight`` can still change an output (a request neither aborted nor finished)."""
    return flight is not None and any(not (r.aborted or r.finished) for r, _, _, _ in flight.samples)
