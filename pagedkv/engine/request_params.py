"""A request's SamplingParams made concrete for one engine, before anything is queued.

    truncate_prompt_tokens=k     the prompt's last k tokens (-1: the last max_model_len)
    max_tokens=None              max_model_len - prompt length (the context left; none left: refused)
    penalties, lists             token ids checked against the vocabulary, bad words tokenized (RequestLists)
    structured_outputs           the grammar compiled (cached by schema); a schema that does not compile is
                                 refused with one line

Every check raises ``ValueError`` naming the field; nothing changes before all of them pass.
"""
from __future__ import annotations

from dataclasses import replace

from .runner.logits_process import RequestLists, needs_state
from ..sampling_params import SamplingParams


def resolve_params(params: SamplingParams, prompt_ids: list[int], max_model_len: int, lists: RequestLists,
                   grammars=None) -> tuple[list[int], SamplingParams]:
    """``(prompt ids, params)`` as the engine runs them (see the module docstring)."""
    t = params.truncate_prompt_tokens
    if t is not None:
        prompt_ids = prompt_ids[-(max_model_len if t == -1 else t):]
    if params.max_tokens is None:
        remaining = max_model_len - len(prompt_ids)
        if remaining < 1:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) leaves no room in max_model_len="
                             f"{max_model_len} for max_tokens=None (the context left)")
        params = replace(params, max_tokens=remaining)
    if needs_state(params):
        lists.words(params)
    if params.structured_outputs is not None:
        if grammars is None:
            raise ValueError("structured_outputs needs a tokenizer on the engine")
        grammars.check(params.structured_outputs)
    return prompt_ids, params
