"""Incremental detokenization with stop strings: token ids in, text that only grows out.

Text is decoded over a sliding window of ids (vLLM's prefix/read offsets): ``prefix`` marks where the window
starts, ``read`` where the text already emitted ends. A new token's text is ``decode(ids[prefix:])`` minus
``decode(ids[prefix:read])``; a window whose text ends in U+FFFD stopped mid-character (a byte-level token
holding half of a UTF-8 sequence), so nothing is emitted until a later token completes it::

    ids      [ ...prompt tail...  | t0  t1  t2 ]     t1 = first 2 bytes of "中", t2 = its last byte
    t0:      decode(ctx + t0) - decode(ctx)           -> " a"     prefix = len(ctx),     read = +1
    t1:      decode(t0 t1)    - decode(t0)  = "\\ufffd" ending   -> ""   (offsets unchanged: wait)
    t2:      decode(t0 t1 t2) - decode(t0)            -> "中"    prefix = read, read = len(ids)

The window starts with a few prompt tokens so decoders that strip the first token's leading space
(SentencePiece's Metaspace) keep the first output token's space.

Stop strings are matched on the decoded text as if it arrived one character at a time: the first stop string
to *end* wins (the longest of those ending at the same character); the text is cut before it (after it with
``include_stop_str_in_output``). ``.text`` never shrinks: a tail that could still become a stop string
("\\n" when "\\n\\n" is a stop string) is withheld until the next characters resolve it, or until ``finish``.
"""
from __future__ import annotations

from .stop_matcher import StopMatcher, stop_matcher

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens decoded ahead of the output (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)


class IncrementalDetokenizer:
    """One branch's output text, fed token by token.

    Args:
        tokenizer: a :class:`pagedkv.text.Tokenizer` (anything with ``decode(ids, skip_special_tokens)``).
        prompt_token_ids: the prompt (its last few tokens give the first output token its context).
        params: a ``SamplingParams`` (``stop``, ``include_stop_str_in_output``, ``skip_special_tokens``),
            or None for no stop strings.
    Attributes:
        text: the output text released so far (only grows).
        stop_reason: the stop string that ended the text, or None.
        finished: True after a stop string matched or :meth:`finish` ran.
    """

    def __init__(self, tokenizer, prompt_token_ids, params=None):
        self.tokenizer = tokenizer
        self.stop = tuple(params.stop) if params is not None else ()
        self.include_stop = bool(params.include_stop_str_in_output) if params is not None else False
        self.skip_special_tokens = bool(params.skip_special_tokens) if params is not None else True
        self._ids = [int(t) for t in list(prompt_token_ids)[-CONTEXT_TOKENS:]]
        self._prefix, self._read = 0, len(self._ids)
        self._prefix_text = self._decode(0, self._read)
        self._full = ""  # every complete character decoded so far (self.text is a prefix of it)
        self.text = ""
        self.stop_reason: str | None = None
        self.finished = False
        self._matcher = stop_matcher(self.stop) if self.stop else None
        self._state = StopMatcher.start

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def update(self, new_token_ids) -> str | None:
        """Feed newly sampled ids; returns the stop string that matched (the text is cut), else None.

        Raises:
            ValueError: called after a stop string matched or after :meth:`finish`.
        """
        if self.finished:
            raise ValueError(f"this detokenizer already finished (stop_reason={self.stop_reason!r})")
        self._ids.extend(int(t) for t in new_token_ids)
        return self._advance(flush=False)

    def finish(self) -> str | None:
        """The branch ended (EOS, length, abort): emit any withheld text, even an incomplete character's U+FFFD.

        Returns the stop string that the flushed text completed, if any (the text is cut the same way).
        """
        if self.finished:
            return None
        matched = self._advance(flush=True)
        if not self.finished:
            self.text, self.finished = self._full, True
        return matched

    def _advance(self, flush: bool) -> str | None:
        new_text = self._decode(self._prefix)
        if len(new_text) > len(self._prefix_text) and (flush or not new_text.endswith(REPLACEMENT)):
            delta = new_text[len(self._prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._prefix, self._read)
            old_len = len(self._full)
            self._full += delta
            matched = self._match_stop(old_len)
            if matched is not None:
                return matched
        # else: mid-character, or no new text (a skipped special token): wait for the next token
        self._release(flush)
        return None

    def _match_stop(self, old_len: int) -> str | None:
        """The stop string completed first by the characters after ``old_len``; cuts the text there.

        NOTE: the automaton reads each character once (:mod:`pagedkv.text.stop_matcher`): the work per token is
        its new characters, not the number or length of the stop strings."""
        if self._matcher is None:
            return None
        state, feed = self._state, self._matcher.feed
        for j in range(old_len, len(self._full)):
            state, s = feed(state, self._full[j])
            if s is not None:
                i = j + 1 - len(s)
                self._full = self._full[:i + len(s) if self.include_stop else i]
                self.text, self.stop_reason, self.finished = self._full, s, True
                return s
        self._state = state
        return None

    def _release(self, flush: bool) -> None:
        keep = len(self._full) if flush or self.include_stop else len(self._full) - self._withheld()
        if keep > len(self.text):
            self.text = self._full[:keep]

    def _withheld(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string (the automaton's
        depth: a whole stop string there would have matched)."""
        return 0 if self._matcher is None else self._matcher.depth(self._state)
