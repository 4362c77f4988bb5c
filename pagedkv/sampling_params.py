"""SamplingParams at the ground floor: how one request is decoded (the model, the engine and the server read it)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_N = 1024  # branches per request; the engine also refuses n > max_num_seqs
MAX_LOGPROBS = 20  # top log-probabilities per token (OpenAI's limit for chat; vLLM's default max_logprobs)
MIN_TEMPERATURE = 1e-3  # below this (and above 0) logits / T overflow float32 for ordinary logit ranges


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request is decoded (vLLM's names and meaning). Immutable: a submitted request cannot change.

    ``temperature == 0`` is greedy. ``top_k <= 0``, ``top_p == 1`` and ``min_p == 0`` disable those
    filters. ``n`` branches share the prompt's KV blocks (``fork_sequence``). ``seed`` makes sampling
    reproducible per request, whatever else is in the batch.

    Text fields need a tokenizer on the engine: ``stop`` strings are matched on the detokenized text and cut
    from it (kept with ``include_stop_str_in_output``). ``logprobs=k`` returns, for each sampled token, its
    log-probability and the ``k`` most likely tokens' (``0``: the sampled token's only), from the model's
    distribution before temperature and filters; ``prompt_logprobs`` the same for prompt tokens.

    Validation is O(1) in ``n`` and raises ``ValueError`` naming the field.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an int in [1, {MAX_N}], got {self.n!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or not math.isfinite(t) or \
                not (t == 0 or t >= MIN_TEMPERATURE):
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {t!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an int, -1 or 0 to disable it, got {self.top_k!r}")
        for name, value, low_open in (("top_p", self.top_p, True), ("min_p", self.min_p, False)):
            ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and \
                math.isfinite(value) and (0 < value <= 1 if low_open else 0 <= value <= 1)
            if not ok:
                raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an int in [0, {MAX_LOGPROBS}], got {value!r}")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _token_ids(self.stop_token_ids))
        for name in ("n", "max_tokens", "top_k", "seed", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, int(value))
        for name in ("temperature", "top_p", "min_p"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def branch_seed(self, index: int) -> int | None:
        """The seed of branch ``index`` (None when the request has none): independent across branches."""
        if self.seed is None:
            return None
        return int(np.random.SeedSequence([self.seed, index]).generate_state(2, np.uint32).view(np.uint64)[0]
                   >> np.uint64(1))


def _stop_strings(stop) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    try:
        stop = tuple(stop)
    except TypeError:
        raise ValueError(f"stop must be a string or a sequence of strings, got {stop!r}") from None
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
    return stop


def _token_ids(ids) -> tuple[int, ...]:
    try:
        ids = tuple(ids)
    except TypeError:
        raise ValueError(f"stop_token_ids must be a sequence of ints, got {ids!r}") from None
    if not all(_is_int(t) and t >= 0 for t in ids):
        raise ValueError(f"stop_token_ids must be non-negative ints, got {ids!r}")
    return tuple(int(t) for t in ids)

