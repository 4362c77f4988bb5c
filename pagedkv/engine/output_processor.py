"""Sampled tokens into branches: logprobs, detokenized text, and the stop rules that end a branch.

A branch ends, checked in this order after each new token (vLLM's order):

    EOS           token in the engine's EOS ids (unless ignore_eos)    finish "stop", stop_reason None
    stop token    token in params.stop_token_ids                       finish "stop", stop_reason = the id
    stop string   the detokenizer matched one of params.stop           finish "stop", stop_reason = the string
    length        max_tokens reached                                   finish "length"

Before ``min_tokens`` outputs no stop rule applies (vLLM's order; the sampler masks EOS and stop ids too).

EOS and stop tokens are kept in ``token_ids`` but not fed to the detokenizer (their text is not output).

A token is placed when the step that samples it is launched (:meth:`OutputProcessor.place`: a placeholder, and
``started``) and filled when its value is read back (:meth:`OutputProcessor.fill`: the stop rules). With the
engine's asynchronous scheduling a branch that ends on step ``N`` may already be in step ``N + 1``: that
token is dropped, never reported.
"""
from __future__ import annotations

from .request import PLACEHOLDER, Branch, Request


class OutputProcessor:
    """Args:
        eos_token_ids: ids that end a branch unless its params say ``ignore_eos``.
        tokenizer: when set, each branch gets a ``pagedkv.text.detokenizer.IncrementalDetokenizer`` at its
            first token (text and stop strings); None: text stays "" (stop strings are refused up front).
    """

    def __init__(self, eos_token_ids: frozenset[int], tokenizer=None):
        self.eos_token_ids, self.tokenizer = eos_token_ids, tokenizer

    @staticmethod
    def place(request: Request, branch: Branch) -> bool:
        """A launched step samples the branch's next token: a placeholder until its value is read back. Returns
        True when that token is certainly the branch's last (``max_tokens`` reached, whatever its value)."""
        branch.output_token_ids.append(PLACEHOLDER)
        request.started = True
        return len(branch.output_token_ids) >= request.params.max_tokens

    def fill(self, request: Request, branch: Branch, index: int, token: int, logprobs, now: float) -> bool | None:
        """The value of output ``index`` (``logprobs``: its ``(entries, logprob)`` or None). Returns None when the
        token is discarded (the branch ended before it, or was aborted), else True when the branch ended with it."""
        ids, p = branch.output_token_ids, request.params
        if branch.finished or index >= len(ids) or ids[index] != PLACEHOLDER:
            return None
        ids[index] = token
        if logprobs is not None:
            entries, logprob = logprobs
            if branch.logprobs is None:
                branch.logprobs, branch.cumulative_logprob = [], 0.0
            branch.logprobs.append(entries)
            branch.cumulative_logprob += logprob
        m = request.metrics
        m.first_token_time = now if m.first_token_time is None else m.first_token_time
        m.last_token_time = now
        if index + 1 < p.min_tokens:  # vLLM: no stop rule before min_tokens (EOS/stop ids are masked anyway)
            self._detokenize(request, branch, token)
        elif not p.ignore_eos and token in self.eos_token_ids:
            branch.finish_reason = "stop"
        elif token in p.stop_token_ids:
            branch.finish_reason, branch.stop_reason = "stop", token
        else:
            matched = self._detokenize(request, branch, token)
            if matched is not None:
                branch.finish_reason, branch.stop_reason = "stop", matched
            elif index + 1 >= p.max_tokens:
                branch.finish_reason = "length"
        if branch.finished:
            del ids[index + 1:]  # NOTE: a later step may have sampled for it already: never reported
            self.flush(branch)
        return branch.finished

    def _detokenize(self, request: Request, branch: Branch, token: int) -> str | None:
        if self.tokenizer is None:
            return None
        if branch.detokenizer is None:
            from ..text.detokenizer import IncrementalDetokenizer

            branch.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.params)
        return branch.detokenizer.update([token])

    @staticmethod
    def flush(branch: Branch) -> None:
        """The branch ended (any reason): release the detokenizer's withheld text (it may complete a stop
        string, which then becomes the stop reason)."""
        if branch.detokenizer is None or isinstance(branch.stop_reason, str):
            return
        matched = branch.detokenizer.finish()
        if matched is not None and branch.finish_reason != "abort":
            branch.finish_reason, branch.stop_reason = "stop", matched
