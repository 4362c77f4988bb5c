"""What :class:`pagedkv.LLM` accepts, in vLLM's shapes, checked before anything is queued.

Prompts (``generate``, ``beam_search``)::

    "text"                                  one text prompt
    [1, 2, 3]                               one prompt of token ids (ints; bools are refused)
    {"prompt": "text"}                      vLLM's TextPrompt
    {"prompt_token_ids": [1, 2, 3]}         vLLM's TokensPrompt (an optional "prompt" text rides along)
    [any of the above, ...]                 several prompts

Constructor options: vLLM's names (``dtype="auto"``, ``gpu_memory_utilization``, ``enforce_eager``,
``kv_cache_dtype``, ``max_model_len``, ``max_num_seqs``, ``max_num_batched_tokens``, ``enable_prefix_caching``,
``enable_chunked_prefill``, ``seed``, ``tensor_parallel_size``, ``trust_remote_code``) translated to
:class:`~pagedkv.engine.EngineConfig` fields (whose own names are accepted too). A value pagedkv cannot honour
is refused with one line naming what it supports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TypedDict

import numpy as np

DTYPES = {"auto": None, "half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32",
          "float32": "float32"}
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


class TextPrompt(TypedDict, total=False):
    """vLLM's ``TextPrompt``: ``{"prompt": str}``."""

    prompt: str


class TokensPrompt(TypedDict, total=False):
    """vLLM's ``TokensPrompt``: ``{"prompt_token_ids": list[int]}`` (``prompt``: its text, optional)."""

    prompt_token_ids: list[int]
    prompt: str


@dataclass(slots=True)
class Prompt:
    """One parsed prompt: its text (None for ids only) and its ids (None until encoded)."""

    text: str | None
    token_ids: list[int] | None


def _is_int(t) -> bool:
    return isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_))


def is_token_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(_is_int(t) for t in prompt)


def token_ids(value, where: str) -> list[int]:
    """A non-empty list of ints (no bools) as Python ints."""
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) == 0:
        raise ValueError(f"{where}: token ids must be a non-empty list of ints, got {value!r:.80}")
    for i, t in enumerate(value):
        if isinstance(t, (bool, np.bool_)):
            raise ValueError(f"{where}: token id {i} is a bool ({t!r}); token ids are ints")
        if not _is_int(t):
            raise ValueError(f"{where}: token id {i} must be an int, got {t!r:.40}")
    return [int(t) for t in value]


def check_text(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where} is not valid UTF-8: a lone surrogate {text[exc.start]!r} at character "
                         f"{exc.start}") from None
    return text


def parse_prompt(prompt, where: str) -> Prompt:
    if isinstance(prompt, str):
        return Prompt(check_text(prompt, where), None)
    if isinstance(prompt, dict):
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids"})
        if unknown:
            raise ValueError(f"{where}: unsupported prompt keys {unknown} (pagedkv takes 'prompt' or "
                             f"'prompt_token_ids'; no multi-modal data)")
        text = prompt.get("prompt")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{where}: 'prompt' must be a string, got {type(text).__name__}")
        if "prompt_token_ids" in prompt:
            return Prompt(None if text is None else check_text(text, where),
                          token_ids(prompt["prompt_token_ids"], where))
        if text is None:
            raise ValueError(f"{where}: a prompt dict needs 'prompt' (TextPrompt) or 'prompt_token_ids' (TokensPrompt)")
        return Prompt(check_text(text, where), None)
    if isinstance(prompt, (list, tuple, np.ndarray)):
        return Prompt(None, token_ids(prompt, where))
    raise ValueError(f"{where} must be a string, a list of token ids, or a TextPrompt/TokensPrompt dict; got "
                     f"{type(prompt).__name__}")


def parse_prompts(prompts) -> list[Prompt]:
    """One prompt or a non-empty list of them (see the module docstring)."""
    if isinstance(prompts, (str, dict)) or is_token_ids(prompts):
        return [parse_prompt(prompts, "prompt")]
    if isinstance(prompts, (list, tuple)) and prompts:
        if all(isinstance(p, (bool, np.bool_)) for p in prompts):
            raise ValueError(f"prompts {prompts!r:.80} are bools; token ids are ints")
        return [parse_prompt(p, f"prompt {i}") for i, p in enumerate(prompts)]
    raise ValueError(f"prompts must be a string, a list of token ids, a prompt dict, or a non-empty list of those; "
                     f"got {prompts!r:.80}")


def per_prompt(params, num_prompts: int, default) -> list:
    """One SamplingParams (or None: ``default``) for all, or a list with one per prompt."""
    if isinstance(params, (list, tuple)):
        if len(params) != num_prompts:
            raise ValueError(f"{num_prompts} prompts but {len(params)} sampling params")
        return [default if p is None else p for p in params]
    return [default if params is None else params] * num_prompts


# ------------------------------------------------------------------------------------------- options
def engine_options(options: dict, config_fields: set[str], on_gpu: bool) -> dict:
    """vLLM's ``LLM(...)`` keywords → EngineConfig fields; refuses what pagedkv cannot honour."""
    options = dict(options)
    out = {}
    if "dtype" in options:
        dtype = options.pop("dtype")
        if isinstance(dtype, str) and dtype in DTYPES:
            dtype = DTYPES[dtype]
        out["dtype"] = dtype
    if "enforce_eager" in options:
        eager = options.pop("enforce_eager")
        if not isinstance(eager, bool):
            raise ValueError(f"enforce_eager must be a bool, got {eager!r}")
        out["cuda_graph"] = on_gpu and not eager
    if "gpu_memory_utilization" in options:
        util = options.pop("gpu_memory_utilization")
        if isinstance(util, bool) or not isinstance(util, (int, float)) or not math.isfinite(util) or \
                not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {util!r}")
        if on_gpu:
            out["gpu_memory_utilization"] = float(util)
    if "kv_cache_dtype" in options:
        out.update(_kv_cache_dtype(options.pop("kv_cache_dtype"), config_fields))
    if "trust_remote_code" in options:
        trust = options.pop("trust_remote_code")
        if not isinstance(trust, bool):
            raise ValueError(f"trust_remote_code must be a bool, got {trust!r}")  # NOTE: no checkpoint code runs
    if "tensor_parallel_size" in options and "tensor_parallel_size" not in config_fields:
        tp = options.pop("tensor_parallel_size")
        if tp != 1:
            raise ValueError(f"tensor_parallel_size={tp!r}: this pagedkv runs one device (tensor_parallel_size=1)")
    unknown = sorted(set(options) - config_fields)
    if unknown:
        raise ValueError(f"LLM() got unsupported option(s) {unknown}; supported: vLLM's dtype, gpu_memory_utilization, "
                         f"enforce_eager, kv_cache_dtype, trust_remote_code and EngineConfig's {sorted(config_fields)}")
    out.update(options)
    return out


def _kv_cache_dtype(value, config_fields: set[str]) -> dict:
    if value not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {value!r}")
    if "kv_cache_dtype" in config_fields:
        return {"kv_cache_dtype": value}
    if value != "auto":
        raise ValueError(f"kv_cache_dtype={value!r}: this pagedkv stores the KV cache in the model's dtype "
                         "(kv_cache_dtype='auto' only)")
    return {}


def config_field_names(config_cls) -> set[str]:
    return {f.name for f in fields(config_cls)}
