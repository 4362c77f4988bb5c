"""Log-probabilities a step's rows ask for: computed on the device right after sampling, read back with it.

Sampled tokens (``SamplingParams.logprobs``) and prompt tokens (``prompt_logprobs``) go through
:func:`pagedkv.engine.runner.sampler.logprobs` (the model's distribution before temperature and filters), eagerly,
after the step's graph and before the next step is launched (the graph's logits are still valid then). The
results are copied to pinned host memory with the step's tokens; :meth:`LogprobRequests.results` turns them into
the outputs' dicts: the ``k`` most likely ids from the most likely down, then the token itself if not among them.
"""
from __future__ import annotations

import numpy as np

from ...logprob import Logprob
from .sampler import logprobs


class LogprobRequests:
    """Args:
        logits: the step's logits [R, vocab]; sampled: the device buffer of sampled tokens.
        positions: each sequence's sampled positions (the first is its logits row); seqs: the scheduled ones.
        prompt_rows: ``(logits row, request, prompt position)`` whose logprobs score that prompt token.
    """

    def __init__(self, xp, logits, sampled, positions, seqs, prompt_rows):
        self.xp, self.logits, self.sampled = xp, logits, sampled
        self.sampled_rows = [(p, pos[0], s.request.params.logprobs) for s, pos in zip(seqs, positions)
                             if pos and s.request.params.logprobs is not None for p in pos]
        self.prompt_rows = prompt_rows
        self._sampled = self._prompt = None

    def enqueue(self, copies) -> None:
        """Compute on the device (current stream) and queue the copies to the host."""
        xp = self.xp
        if self.sampled_rows:
            pos, rows, num_top = zip(*self.sampled_rows)
            tokens = self.sampled[xp.asarray(np.array(pos, dtype=np.int64))]
            x = self._rows(rows)
            self._sampled = tuple(map(copies, (*logprobs(x, tokens, max(num_top)), _ranks(xp, x, tokens))))
        if self.prompt_rows:
            rows, targets = zip(*((row, r.prompt_token_ids[p]) for row, r, p in self.prompt_rows))
            num_top = max(r.params.prompt_logprobs for _, r, _ in self.prompt_rows)
            ids = xp.asarray(np.array(targets, dtype=np.int64))
            x = self._rows(rows)
            self._prompt = tuple(map(copies, (*logprobs(x, ids, num_top), _ranks(xp, x, ids))))
        self.logits = self.sampled = None  # NOTE: the graph's buffers: not touched after this step's launch

    def _rows(self, rows):
        return self.logits[self.xp.asarray(np.array(rows, dtype=np.int64))]

    def results(self, tokens: np.ndarray) -> tuple[dict, list]:
        """(sampled position -> (entries, logprob), [(request, prompt position, entries)]) once the copies landed."""
        sampled, prompt = {}, []
        if self._sampled is not None:
            lp, ids, top, rank = self._sampled
            for j, (p, _, k) in enumerate(self.sampled_rows):
                entries = _entries(ids[j, :k], top[j, :k], int(tokens[p]), float(lp[j]), int(rank[j]))
                sampled[p] = (entries, float(lp[j]))
        if self._prompt is not None:
            lp, ids, top, rank = self._prompt
            for j, (_, request, position) in enumerate(self.prompt_rows):
                k = request.params.prompt_logprobs
                prompt.append((request, position, _entries(ids[j, :k], top[j, :k], request.prompt_token_ids[position],
                                                           float(lp[j]), int(rank[j]))))
        return sampled, prompt


def _ranks(xp, logits, token_ids):
    """int32 [R]: each token's rank in its row (1 = the most likely), counted on the device."""
    picked = xp.take_along_axis(logits, token_ids.astype(xp.int64)[:, None], axis=1)
    return ((logits > picked).sum(axis=1) + 1).astype(xp.int32)


def _entries(top_ids, top_logprobs, token: int, logprob: float, rank: int) -> dict[int, Logprob]:
    entries = {int(i): Logprob(float(v), r + 1) for r, (i, v) in enumerate(zip(top_ids, top_logprobs))}
    entries.setdefault(token, Logprob(logprob, rank))
    return entries
