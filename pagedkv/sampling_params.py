"""SamplingParams at the ground floor: how one request is decoded (vLLM's names, defaults and validation).

Fields in vLLM's order; every one is checked in ``__post_init__`` and a bad value raises
:class:`SamplingParamsError` (a ``ValueError``, also a ``TypeError`` for unknown names) naming the field,
in one line. Checks that need the engine (token ids against the vocabulary, ``max_tokens=None`` resolved to
the context left, bad words tokenized, grammars compiled) happen when the request is added.

Penalties and friends follow vLLM's semantics (applied on the device, :mod:`pagedkv.engine.runner.logits_process`):

    allowed_token_ids   every other token -inf                     bad_words   last token of a word -inf when
    min_tokens          EOS + stop_token_ids -inf until reached                 the output ends with its prefix
    logit_bias          logits[id] += bias
    repetition_penalty  tokens of the prompt or the output: x / r if x > 0 else x * r
    frequency_penalty   x -= frequency_penalty * (times the token was generated)
    presence_penalty    x -= presence_penalty  (if the token was generated at all)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from .structured_params import GuidedDecodingParams, StructuredOutputsParams  # noqa: F401 (re-exported)

MAX_N = 1024  # branches per request; the engine also refuses n > max_num_seqs
MAX_LOGPROBS = 20  # top log-probabilities per token (OpenAI's limit for chat; vLLM's default max_logprobs)
MIN_TEMPERATURE = 1e-3  # below this (and above 0) logits / T overflow float32 for ordinary logit ranges


class SamplingParamsError(ValueError, TypeError):
    """A bad SamplingParams field (a ``ValueError``; a ``TypeError`` too, as for an unknown keyword). The message
    starts with the field's name; ``param`` holds it (None for an unknown field)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(value)


def _fail(name: str, expected: str, value) -> None:
    raise SamplingParamsError(f"{name} must be {expected}, got {value!r}", name)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request is decoded (vLLM's names, defaults and meaning). Immutable: :meth:`clone` copies.

    ``temperature == 0`` is greedy. ``top_k`` 0 or -1, ``top_p == 1`` and ``min_p == 0`` disable those
    filters. ``n`` branches share the prompt's KV blocks (``fork_sequence``); ``best_of`` may only repeat
    ``n``. ``seed`` makes sampling reproducible per request, whatever else is in the batch.
    ``max_tokens=None``: up to the context limit. ``truncate_prompt_tokens=k``: only the prompt's last ``k``
    tokens are used (-1: as many as the context allows).

    Text fields need a tokenizer on the engine: ``stop`` strings are matched on the detokenized text and cut
    from it (kept with ``include_stop_str_in_output``); ``bad_words`` are tokenized (with and without a
    leading space, as vLLM does). ``logprobs=k`` returns, for each sampled token, its log-probability and the
    ``k`` most likely tokens' (``0``: the sampled token's only), from the model's raw distribution (before
    penalties, temperature and filters); ``prompt_logprobs`` the same for prompt tokens.
    ``spaces_between_special_tokens`` is accepted for vLLM's sake: fast tokenizers (the only kind pagedkv
    reads) decide spacing themselves, as in vLLM.

    ``structured_outputs`` (or its older name ``guided_decoding``): a :class:`StructuredOutputsParams` (or a
    dict of its fields); the output then matches the JSON schema, regex, choice or grammar.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None
    logit_bias: dict | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] | None = None

    def __post_init__(self):
        for check in (_check_counts, _check_floats, _check_ints, _check_flags, _check_lists, _check_structured):
            check(self)

    # ----------------------------------------------------------------------------------------- views
    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def clone(self) -> SamplingParams:
        """A copy (vLLM's ``clone``); fields can be changed with ``dataclasses.replace``."""
        return replace(self)

    def branch_seed(self, index: int) -> int | None:
        """The seed of branch ``index`` (None when the request has none): independent across branches."""
        if self.seed is None:
            return None
        return int(np.random.SeedSequence([self.seed, index]).generate_state(2, np.uint32).view(np.uint64)[0]
                   >> np.uint64(1))


FIELD_NAMES = frozenset(f.name for f in fields(SamplingParams))
_dataclass_init = SamplingParams.__init__


def _init(self, *args, **kwargs):
    unknown = sorted(set(kwargs) - FIELD_NAMES)
    if unknown:
        raise SamplingParamsError(f"SamplingParams has no field {unknown[0]!r}"
                                  + (f" (nor {unknown[1:]})" if len(unknown) > 1 else ""))
    if len(args) > len(FIELD_NAMES):
        raise SamplingParamsError(f"SamplingParams takes at most {len(FIELD_NAMES)} positional arguments")
    _dataclass_init(self, *args, **kwargs)


_init.__doc__, _init.__signature__ = _dataclass_init.__doc__, __import__("inspect").signature(_dataclass_init)
SamplingParams.__init__ = _init


def _set(p: SamplingParams, name: str, value) -> None:
    object.__setattr__(p, name, value)


def _check_counts(p: SamplingParams) -> None:
    if not _is_int(p.n) or not 1 <= p.n <= MAX_N:
        _fail("n", f"an int in [1, {MAX_N}]", p.n)
    if p.best_of is not None:
        if not _is_int(p.best_of) or p.best_of < p.n:
            _fail("best_of", f"None or an int >= n ({p.n})", p.best_of)
        if p.best_of != p.n:
            raise SamplingParamsError(f"best_of {p.best_of} > n={p.n} is not supported (as in vLLM V1): ask for "
                                      f"n={p.best_of} and pick by cumulative_logprob", "best_of")
    if p.max_tokens is not None and (not _is_int(p.max_tokens) or p.max_tokens < 1):
        _fail("max_tokens", "None or an int >= 1", p.max_tokens)
    if not _is_int(p.min_tokens) or p.min_tokens < 0:
        _fail("min_tokens", "an int >= 0", p.min_tokens)
    if p.max_tokens is not None and p.min_tokens > p.max_tokens:
        raise SamplingParamsError(f"min_tokens ({p.min_tokens}) must be <= max_tokens ({p.max_tokens})",
                                  "min_tokens")


def _check_floats(p: SamplingParams) -> None:
    t = p.temperature
    if not _is_number(t) or not (t == 0 or t >= MIN_TEMPERATURE):
        _fail("temperature", f"0 (greedy) or a finite number >= {MIN_TEMPERATURE}", t)
    if not _is_number(p.top_p) or not 0 < p.top_p <= 1:
        _fail("top_p", "in (0, 1]", p.top_p)
    if not _is_number(p.min_p) or not 0 <= p.min_p <= 1:
        _fail("min_p", "in [0, 1]", p.min_p)
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        if not _is_number(value) or not -2 <= value <= 2:
            _fail(name, "in [-2, 2]", value)
    if not _is_number(p.repetition_penalty) or not p.repetition_penalty > 0:
        _fail("repetition_penalty", "a finite number > 0 (1: off)", p.repetition_penalty)
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        _set(p, name, float(getattr(p, name)))


def _check_ints(p: SamplingParams) -> None:
    if not _is_int(p.top_k) or p.top_k < -1:
        _fail("top_k", "an int: 0 or -1 (off) or >= 1", p.top_k)
    if p.seed is not None and (not _is_int(p.seed) or not 0 <= p.seed < 2**63):
        _fail("seed", "None or an int in [0, 2**63)", p.seed)
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(p, name)
        if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
            _fail(name, f"None or an int in [0, {MAX_LOGPROBS}]", value)
    t = p.truncate_prompt_tokens
    if t is not None and (not _is_int(t) or not (t == -1 or t >= 1)):
        _fail("truncate_prompt_tokens", "None, -1 (the context's length) or an int >= 1", t)
    for name in ("n", "best_of", "max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs",
                 "truncate_prompt_tokens"):
        value = getattr(p, name)
        if value is not None:
            _set(p, name, int(value))


def _check_flags(p: SamplingParams) -> None:
    for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens"):
        if not isinstance(getattr(p, name), bool):
            _fail(name, "a bool", getattr(p, name))


def _check_lists(p: SamplingParams) -> None:
    _set(p, "stop", _strings("stop", p.stop, allow_none=True) or ())
    _set(p, "stop_token_ids", _token_ids("stop_token_ids", () if p.stop_token_ids is None else p.stop_token_ids))
    if p.bad_words is not None:
        _set(p, "bad_words", _strings("bad_words", p.bad_words, allow_none=False))
    if p.allowed_token_ids is not None:
        ids = _token_ids("allowed_token_ids", p.allowed_token_ids)
        if not ids:
            _fail("allowed_token_ids", "None or a non-empty list of token ids", p.allowed_token_ids)
        _set(p, "allowed_token_ids", ids)
    if p.logit_bias is not None:
        _set(p, "logit_bias", _logit_bias(p.logit_bias))


def _strings(name: str, value, allow_none: bool) -> tuple[str, ...]:
    if value is None and allow_none:
        return ()
    if isinstance(value, str):
        value = (value,)
    try:
        value = tuple(value)
    except TypeError:
        _fail(name, "a string or a list of strings", value)
    if not all(isinstance(s, str) and s for s in value):
        _fail(name, "non-empty strings", value)
    return value


def _token_ids(name: str, ids) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)):
        _fail(name, "a list of token ids", ids)
    try:
        ids = tuple(ids)
    except TypeError:
        _fail(name, "a list of token ids", ids)
    if not all(_is_int(t) and 0 <= t < 2**31 for t in ids):
        _fail(name, "non-negative int token ids", ids)
    return tuple(int(t) for t in ids)


def _logit_bias(bias) -> dict[int, float]:
    """``{token id: bias}``; keys may be ints or their decimal strings (OpenAI's JSON)."""
    if not isinstance(bias, dict):
        _fail("logit_bias", "None or a dict {token id: bias}", bias)
    out = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else key
        if not _is_int(token) or not 0 <= token < 2**31:
            _fail("logit_bias", "keyed by non-negative token ids", key)
        if not _is_number(value):
            _fail("logit_bias", f"finite numbers (token {key!r})", value)
        out[int(token)] = float(value)
    return out


def _structured(name: str, value):
    try:
        return StructuredOutputsParams.coerce(value, name)
    except ValueError as exc:
        raise SamplingParamsError(str(exc), name) from None


def _check_structured(p: SamplingParams) -> None:
    so = _structured("structured_outputs", p.structured_outputs)
    gd = _structured("guided_decoding", p.guided_decoding)
    if so is not None and gd is not None and so != gd:
        raise SamplingParamsError("structured_outputs and guided_decoding (its older name) differ: give one",
                                  "structured_outputs")
    _set(p, "structured_outputs", so or gd)
    _set(p, "guided_decoding", so or gd)
