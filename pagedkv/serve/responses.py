"""OpenAI response bodies and stream chunks, built from the engine's cumulative outputs.

One :class:`ResponseBuilder` per HTTP request. Choice ``prompt_index * n + branch`` follows a branch's
cumulative ``CompletionOutput``; :meth:`ResponseBuilder.delta_chunks` returns what is new since the last call
(text, token logprobs, the finish reason), so outputs may be coalesced (only the newest one of a burst read).
A stream carries one choice per chunk, with its ``index`` (as OpenAI and vLLM send them); ``echo`` puts the
prompt's text before the completion (the first chunk of each choice carries it)::

    completions chunk   {"id": "cmpl-…", "object": "text_completion", "created", "model",
                         "choices": [{"index", "text", "logprobs", "finish_reason"}]}
    chat chunk          {"id": "chatcmpl-…", "object": "chat.completion.chunk", "created", "model",
                         "choices": [{"index", "delta": {"role"?, "content"?}, "logprobs", "finish_reason"}]}
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

MIN_LOGPROB = -9999.0  # JSON has no -inf (vLLM clamps the same way)


def new_request_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


@dataclass(slots=True)
class ChoiceState:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_text: int = 0  # characters of text already streamed
    sent_tokens: int = 0  # tokens whose logprobs were already streamed
    finish_sent: bool = False


def _lp(value: float) -> float:
    return max(float(value), MIN_LOGPROB)


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely of a position's logprobs (the sampled token is in ``entry`` even outside them)."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


class ResponseBuilder:
    """Tracks one request's choices and formats them for ``kind`` ("completions" or "chat").

    Args:
        prompt_lens: token count of each prompt (``usage.prompt_tokens`` is their sum).
        num_logprobs: top logprobs per token (None: no logprobs).
        tokenizer: turns token ids into the token strings of logprobs.
    """

    def __init__(self, kind: str, model: str, n: int, prompt_lens: list[int], tokenizer, num_logprobs: int | None,
                 include_usage: bool = False, *, request_id: str | None = None, echo: list[str] | None = None):
        self.kind, self.model, self.n, self.prompt_lens = kind, model, n, list(prompt_lens)
        self.tokenizer, self.num_logprobs, self.include_usage = tokenizer, num_logprobs, include_usage
        self.id = request_id or new_request_id(kind)
        self.created = int(time.time())
        self.choices = [ChoiceState(i) for i in range(len(prompt_lens) * n)]
        self.echo = echo  # per prompt: text put before each of its choices' completions
        self._finished_prompts: set[int] = set()

    @property
    def finished(self) -> bool:
        return len(self._finished_prompts) == len(self.prompt_lens)

    def update(self, prompt_index: int, output) -> None:
        """Take a (cumulative) RequestOutput of prompt ``prompt_index``."""
        prefix = self.echo[prompt_index] if self.echo else ""
        for c in output.outputs:
            s = self.choices[prompt_index * self.n + c.index]
            s.text, s.token_ids, s.finish_reason, s.stop_reason = prefix + c.text, list(c.token_ids), \
                c.finish_reason, c.stop_reason
            s.logprobs = list(c.logprobs or [])
        if output.finished:
            self._finished_prompts.add(prompt_index)

    # ------------------------------------------------------------------------------------------ usage
    def usage(self) -> dict:
        prompt = sum(self.prompt_lens)
        completion = sum(len(s.token_ids) for s in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # -------------------------------------------------------------------------------------- logprobs
    def _completion_logprobs(self, s: ChoiceState, start: int, text_offset: int) -> dict | None:
        if self.num_logprobs is None:
            return None
        ids, entries = s.token_ids[start:], s.logprobs[start:]
        tokens = [self.tokenizer.token_text(t) for t in ids]
        offsets, pos = [], text_offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens,
                "token_logprobs": [_lp(e.get(t, MIN_LOGPROB)) for t, e in zip(ids, entries)],
                "top_logprobs": [{self.tokenizer.token_text(i): _lp(v) for i, v in _top(e, self.num_logprobs)}
                                 for e in entries],
                "text_offset": offsets}

    def _chat_logprobs(self, s: ChoiceState, start: int) -> dict | None:
        if self.num_logprobs is None:
            return None

        def item(token_id, value):
            text = self.tokenizer.token_text(token_id)
            return {"token": text, "logprob": _lp(value), "bytes": list(text.encode("utf-8"))}

        content = [{**item(t, e.get(t, MIN_LOGPROB)),
                    "top_logprobs": [item(i, v) for i, v in _top(e, self.num_logprobs)]}
                   for t, e in zip(s.token_ids[start:], s.logprobs[start:])]
        return {"content": content, "refusal": None}

    def _logprobs(self, s: ChoiceState, start: int, text_offset: int) -> dict | None:
        if self.kind == "chat":
            return self._chat_logprobs(s, start)
        return self._completion_logprobs(s, start, text_offset)

    # ------------------------------------------------------------------------------------- whole body
    def response(self) -> dict:
        """The non-streamed body (call when :attr:`finished`)."""
        choices = []
        for s in self.choices:
            choice = {"index": s.index, "logprobs": self._logprobs(s, 0, 0), "finish_reason": s.finish_reason,
                      "stop_reason": s.stop_reason}
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": s.text, "refusal": None, "tool_calls": []}
            else:
                choice["text"] = s.text
            choices.append(choice)
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage(), "system_fingerprint": None}

    # ----------------------------------------------------------------------------------------- chunks
    def _chunk(self, choices: list[dict]) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        chunk = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                 "system_fingerprint": None}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def role_chunks(self) -> list[dict]:
        """Chat streams open with the assistant role, one chunk per choice."""
        if self.kind != "chat":
            return []
        return [self._chunk([{"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for s in self.choices]

    def delta_chunks(self) -> list[dict]:
        """What changed since the last call: one chunk per choice that changed."""
        return [self._chunk([d]) for s in self.choices if (d := self._delta(s)) is not None]

    def _delta(self, s: ChoiceState) -> dict | None:
        text = s.text[s.sent_text:]
        new_tokens = len(s.token_ids) > s.sent_tokens and self.num_logprobs is not None
        finish = s.finish_reason is not None and not s.finish_sent
        if not text and not new_tokens and not finish:
            return None
        logprobs = self._logprobs(s, s.sent_tokens, s.sent_text)
        s.sent_text, s.sent_tokens, s.finish_sent = len(s.text), len(s.token_ids), s.finish_sent or finish
        delta = {"index": s.index, "logprobs": logprobs, "finish_reason": s.finish_reason if finish else None}
        if self.kind == "chat":
            delta["delta"] = {"content": text} if text or not finish else {}
        else:
            delta["text"] = text
        if finish:
            delta["stop_reason"] = s.stop_reason
        return delta

    def usage_chunk(self) -> dict | None:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        if not self.include_usage:
            return None
        return {**self._chunk([]), "usage": self.usage()}
