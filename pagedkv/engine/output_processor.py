"""Sampled tokens into branches: logprobs, detokenized text, and the stop rules that end a branch.

A branch ends, checked in this order after each new token (vLLM's order):

    EOS           token in the engine's EOS ids (unless ignore_eos)    finish "stop", stop_reason None
    stop token    token in params.stop_token_ids                       finish "stop", stop_reason = the id
    stop string   the detokenizer matched one of params.stop           finish "stop", stop_reason = the string
    length        max_tokens reached                                   finish "length"

EOS and stop tokens are kept in ``token_ids`` but not fed to the detokenizer (their text is not output).
"""
from __future__ import annotations

from .request import Branch, Request


class OutputProcessor:
    """Args:
        eos_token_ids: ids that end a branch unless its params say ``ignore_eos``.
        tokenizer: when set, each branch gets a ``pagedkv.text.detokenizer.IncrementalDetokenizer`` at its
            first token (text and stop strings); None: text stays "" (stop strings are refused up front).
    """

    def __init__(self, eos_token_ids: frozenset[int], tokenizer=None):
        self.eos_token_ids, self.tokenizer = eos_token_ids, tokenizer

    def append(self, request: Request, branch: Branch, token: int, logprobs, now: float) -> bool:
        """Add one token to ``branch`` (``logprobs``: its ``(entries, logprob)`` or None); returns True when the
        branch ended with it."""
        p = request.params
        branch.output_token_ids.append(token)
        request.started = True
        if logprobs is not None:
            entries, logprob = logprobs
            if branch.logprobs is None:
                branch.logprobs, branch.cumulative_logprob = [], 0.0
            branch.logprobs.append(entries)
            branch.cumulative_logprob += logprob
        m = request.metrics
        m.first_token_time = now if m.first_token_time is None else m.first_token_time
        m.last_token_time = now
        if not p.ignore_eos and token in self.eos_token_ids:
            branch.finish_reason = "stop"
        elif token in p.stop_token_ids:
            branch.finish_reason, branch.stop_reason = "stop", token
        else:
            matched = self._detokenize(request, branch, token)
            if matched is not None:
                branch.finish_reason, branch.stop_reason = "stop", matched
            elif len(branch.output_token_ids) >= p.max_tokens:
                branch.finish_reason = "length"
        if branch.finished:
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
