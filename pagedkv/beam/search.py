"""Beam search through ``fork_sequence``: vLLM's ``LLM.beam_search`` rules on the engine's paged KV cache.

::

    outs = beam_search(engine, [[1, 2, 3], [4, 5]], beam_width=4, max_tokens=32)
    best = outs[0].sequences[0]          # token_ids, cumulative_logprob, score, finish_reason

Rules (those of vLLM's ``LLM.beam_search``, checked against an exhaustive float64 reference in
tests/test_beam_search.py):

- every step scores the ``2 * beam_width`` most likely next tokens of each live beam (log-softmax of the
  model's raw logits, float32); a candidate ending in EOS is finished at once (unless ``ignore_eos``); of the
  others the ``beam_width`` best by score continue;
- after ``max_tokens`` steps the live beams finish with ``"length"``; each prompt returns the ``beam_width``
  best of all its finished beams, best first;
- ``score = cumulative_logprob / length ** length_penalty``, ``length`` = prompt tokens + generated tokens, an
  ending EOS not counted (vLLM's ``get_beam_search_score``; Hugging Face counts only the generated tokens).
  There is no early stopping: the search runs until every beam finished or ``max_tokens`` tokens.

Memory (:mod:`pagedkv.beam.group`): beams share every common block; a beam that is dropped frees its
blocks at once. The engine must be idle (the search drives its manager, model and KV cache directly). Prompts
are searched together in groups whose worst case fits the pool (and ``max_num_seqs`` rows); a prompt whose
worst case alone does not fit is refused before anything is allocated, so a search never runs out of blocks.
Decode forwards replay the runner's CUDA graphs when the engine captured them, else run eagerly; prefill is
eager. Any exception (``KeyboardInterrupt`` included) frees everything the search holds.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np

from ..cache.block_hash import BlockHasher
from ..sampling_params import SamplingParams
from .group import Beam, BeamGroup, worst_case_blocks
from .handle import EngineHandle


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True, slots=True)
class BeamSearchParams:
    """vLLM's ``BeamSearchParams`` fields that apply here (no ``temperature``: beams are scored on the raw
    log-probabilities; no stop strings: EOS ids only). ``eos_token_ids`` None: the engine's."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] | None = None
    temperature: float = 0.0  # vLLM's field; beams are scored on raw log-probabilities: only 0 is accepted

    def __post_init__(self):
        if self.temperature != 0:
            raise ValueError(f"temperature={self.temperature!r}: pagedkv scores beams on the model's raw "
                             "log-probabilities (temperature=0 only)")
        if not _is_int(self.beam_width) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an int >= 1, got {self.beam_width!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        lp = self.length_penalty
        if isinstance(lp, (bool, np.bool_)) or not isinstance(lp, (int, float, np.integer, np.floating)) or \
                not math.isfinite(lp):
            raise ValueError(f"length_penalty must be a finite number, got {lp!r}")
        if self.eos_token_ids is not None:
            ids = (self.eos_token_ids,) if _is_int(self.eos_token_ids) else self.eos_token_ids
            if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
                raise ValueError(f"eos_token_ids must be None, an int or ints, got {self.eos_token_ids!r}")
            ids = tuple(ids)
            if not all(_is_int(t) and t >= 0 for t in ids):
                raise ValueError(f"eos_token_ids must be non-negative ints, got {self.eos_token_ids!r}")
            object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in ids))


@dataclass(slots=True)
class BeamSequence:
    """One finished beam: its generated tokens (an ending EOS included), their log-probabilities, and its
    score (see the module docstring); ``finish_reason`` is ``"stop"`` (EOS) or ``"length"``."""

    token_ids: list[int]
    cumulative_logprob: float
    score: float
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # the generated text (an ending EOS not included) when searched through LLM.beam_search
    tokens: list[int] = field(default_factory=list)  # vLLM's: prompt + generated ids (set by LLM.beam_search)

    @property
    def cum_logprob(self) -> float:
        """vLLM's name of ``cumulative_logprob``."""
        return self.cumulative_logprob


@dataclass(slots=True)
class BeamSearchOutput:
    """A prompt's best ``beam_width`` (or fewer) sequences, best score first."""

    prompt_token_ids: list[int]
    sequences: list[BeamSequence]
    prompt: str | None = None


def beam_search(engine, prompts_token_ids, beam_width: int, max_tokens: int, length_penalty: float = 1.0, *,
                ignore_eos: bool = False, eos_token_ids=None) -> list[BeamSearchOutput]:
    """Beam search of each prompt on an idle ``LLMEngine``; outputs in the prompts' order.

    Args:
        prompts_token_ids: one prompt (a list of token ids) or a list of them.
        beam_width, max_tokens, length_penalty, ignore_eos: as vLLM's ``BeamSearchParams``.
        eos_token_ids: ids that finish a beam; None: the engine's (``EngineConfig.eos_token_id``).
    Raises:
        ValueError: a bad argument, a busy engine, a prompt longer than ``max_model_len`` allows or whose worst
            case exceeds the free blocks; raised before anything is allocated.
    """
    params = BeamSearchParams(beam_width, max_tokens, ignore_eos, length_penalty,
                              None if eos_token_ids is None else eos_token_ids)
    serial = getattr(engine, "serial", None)  # NOTE: the search drives the engine's manager and model
    with serial.lock if serial is not None else contextlib.nullcontext():  # one caller at a time
        return _search(EngineHandle.of(engine), prompts_token_ids, params)


def _search(engine, prompts_token_ids, params: BeamSearchParams) -> list[BeamSearchOutput]:
    prompts = check_prompts(engine, prompts_token_ids, params)
    groups = plan_groups(engine, prompts, params)
    outputs = []
    for group in groups:
        search = BeamGroup(engine, [prompts[i] for i in group], params, eos_ids(engine, params),
                           hasher=prefix_hasher(engine))
        for prompt, beams in zip(search.prompts, search.run()):
            outputs.append(best_sequences(prompt, beams, params))
    return outputs


def beam_search_text(llm, prompts, beam_width: int, max_tokens: int, length_penalty: float = 1.0, *,
                     ignore_eos: bool = False, skip_special_tokens: bool = True) -> list[BeamSearchOutput]:
    """``beam_search`` for a ``pagedkv.LLM``: prompts are strings (encoded by its tokenizer) or token-id lists;
    every sequence gets its ``text`` when the LLM has a tokenizer (an ending EOS is not decoded)."""
    listed = [prompts] if isinstance(prompts, str) or _is_token_ids(prompts) else prompts
    if not isinstance(listed, (list, tuple)) or not listed:
        raise ValueError(f"prompts must be a string, a list of token ids, or a non-empty list of those; "
                         f"got {prompts!r:.80}")
    ids = [_encode(llm, p) for p in listed]
    outputs = beam_search(llm.engine, ids, beam_width, max_tokens, length_penalty, ignore_eos=ignore_eos)
    for out, prompt in zip(outputs, listed):
        out.prompt = prompt if isinstance(prompt, str) else None
        if llm.tokenizer is not None:
            for s in out.sequences:
                ids = s.token_ids[:-1] if s.finish_reason == "stop" else s.token_ids
                s.text = llm.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    return outputs


def _encode(llm, prompt) -> list[int]:
    """A text prompt through the LLM's tokenizer; token ids as they are (checked by the engine's rules)."""
    if not isinstance(prompt, str):
        return list(prompt)
    if llm.tokenizer is None:
        raise ValueError("a text prompt needs a tokenizer on the LLM: pass token ids")
    return llm.tokenizer.encode(prompt)


# ----------------------------------------------------------------------------------------- validation
def check_prompts(engine, prompts_token_ids, params: BeamSearchParams) -> list[list[int]]:
    """The prompts as lists of ints, each checked by the engine's own request rules (vocabulary, ``prompt +
    max_tokens <= max_model_len``); EOS ids checked against the vocabulary."""
    handle = EngineHandle.of(engine)
    prompts = [prompts_token_ids] if _is_token_ids(prompts_token_ids) else prompts_token_ids
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__") or len(prompts) == 0:
        raise ValueError(f"prompts_token_ids must be a list of token id lists, got {prompts_token_ids!r:.80}")
    probe = SamplingParams(max_tokens=params.max_tokens, temperature=0.0)
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)):
            raise ValueError(f"prompt {i} is text: pass token ids (or use beam_search_text with a tokenizer)")
        try:
            handle.check_request(prompt, probe)
        except ValueError as exc:
            raise ValueError(f"prompt {i}: {exc}") from None
        out.append([int(t) for t in np.asarray(prompt)])
    vocab = handle.vocab_size
    bad = [t for t in params.eos_token_ids or () if t >= vocab]
    if bad:
        raise ValueError(f"eos_token_ids {bad} are outside the vocabulary [0, {vocab})")
    return out


def plan_groups(engine, prompts: list[list[int]], params: BeamSearchParams, *, share: bool = True) -> list[list[int]]:
    """Consecutive prompts searched together: their worst cases fit the free blocks and their beams fit
    ``max_num_seqs`` rows. Refuses (``ValueError``) a busy engine and a prompt that can never fit alone."""
    handle = EngineHandle.of(engine)
    if handle.is_busy():
        raise ValueError("beam search needs an idle engine: it has unfinished requests or live sequences")
    max_rows = handle.max_num_seqs
    if params.beam_width > max_rows:
        raise ValueError(f"beam_width={params.beam_width} exceeds max_num_seqs={max_rows}: its beams could never "
                         f"run in one step")
    free, bs = handle.manager.num_free_blocks, handle.manager.block_size
    groups: list[list[int]] = []
    used = rows = 0
    for i, prompt in enumerate(prompts):
        need = worst_case_blocks(len(prompt), params.max_tokens, params.beam_width, bs, share)
        if need > free:
            raise ValueError(f"prompt {i} ({len(prompt)} tokens, beam_width {params.beam_width}, max_tokens "
                             f"{params.max_tokens}) may need {need} blocks but the pool has {free} free")
        if not groups or used + need > free or rows + params.beam_width > max_rows:
            groups.append([])
            used = rows = 0
        groups[-1].append(i)
        used, rows = used + need, rows + params.beam_width
    return groups


def eos_ids(engine, params: BeamSearchParams) -> frozenset[int]:
    eos = EngineHandle.of(engine).eos_token_ids
    return frozenset(eos if params.eos_token_ids is None else params.eos_token_ids)


def prefix_hasher(engine) -> BlockHasher | None:
    """The engine's block hasher when its manager caches prefixes (its prefix cache's, so that the search and
    the engine name the same blocks alike), else None."""
    return EngineHandle.of(engine).hasher


def best_sequences(prompt: list[int], beams: list[Beam], params: BeamSearchParams) -> BeamSearchOutput:
    """The ``beam_width`` best finished beams of a prompt, best score first (ties: the order they finished)."""
    scored = [(b.score(len(prompt), params.length_penalty), b) for b in beams]
    scored.sort(key=lambda sb: sb[0], reverse=True)
    return BeamSearchOutput(list(prompt), [BeamSequence(b.token_ids, b.cum_logprob, s, b.finish_reason, b.logprobs)
                                           for s, b in scored[:params.beam_width]])


def _is_token_ids(prompt) -> bool:
    if isinstance(prompt, np.ndarray):
        return prompt.ndim == 1
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(_is_int(t) for t in prompt)


__all__ = ["BeamSearchOutput", "BeamSearchParams", "BeamSequence", "beam_search", "beam_search_text"]
