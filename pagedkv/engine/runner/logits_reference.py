"""The float64 oracle of vLLM's logits processors (the order of vLLM's V1 sampler), written from the
definitions, independent of :mod:`pagedkv.engine.runner.logits_process`::

    grammar bitmask, allowed_token_ids    other tokens -inf
    bad_words                             last token of a word -inf when the output ends with the word's prefix
    min_tokens                            EOS and stop ids -inf while len(output) < min_tokens
    logit_bias                            x[id] += bias
    repetition_penalty r                  tokens in prompt or output: x / r if x > 0 else x * r
    frequency_penalty f, presence p       x -= f * count_in_output; x -= p * (count_in_output > 0)
"""
from __future__ import annotations

import numpy as np


def process_reference(logits, params, prompt_ids, output_ids, stop_ids=(), bad_word_ids=(),
                      grammar_allowed=None) -> np.ndarray:
    """float64 [V]: ``logits [V]`` processed for a branch with ``params`` that has generated ``output_ids``."""
    x = np.asarray(logits, dtype=np.float64).copy()
    vocab = x.size
    keep = np.ones(vocab, dtype=bool) if grammar_allowed is None else np.asarray(grammar_allowed, dtype=bool).copy()
    if params.allowed_token_ids is not None:
        allowed = np.zeros(vocab, dtype=bool)
        allowed[list(params.allowed_token_ids)] = True
        keep &= allowed
    x[~keep] = -np.inf
    out = list(output_ids)
    for word in bad_word_ids:
        prefix = list(word[:-1])
        if len(prefix) <= len(out) and (not prefix or out[len(out) - len(prefix):] == prefix):
            x[word[-1]] = -np.inf
    if len(out) < params.min_tokens:
        x[list(stop_ids)] = -np.inf
    for token, bias in (params.logit_bias or {}).items():
        x[token] += bias
    counts = np.bincount(np.asarray(out, dtype=np.int64), minlength=vocab)[:vocab].astype(np.float64)
    seen = counts > 0
    seen[np.asarray(list(prompt_ids), dtype=np.int64)] = True
    r = params.repetition_penalty
    x = np.where(seen, np.where(x > 0, x / r, x * r), x)
    x -= params.frequency_penalty * counts
    x -= params.presence_penalty * (counts > 0)
    return x
