"""Checks of what callers hand the engine, each raising ``ValueError`` naming the bad value."""
from __future__ import annotations

import numpy as np


def check_prompt(prompt_token_ids, vocab_size: int) -> list[int]:
    """A non-empty 1-D sequence of ints in ``[0, vocab_size)``, as a new list of Python ints (a copy: the caller
    may change its own list afterwards)."""
    if isinstance(prompt_token_ids, (list, tuple)) and any(isinstance(t, (bool, np.bool_)) for t in prompt_token_ids):
        raise ValueError("prompt_token_ids must be ints, got a bool (true/false are not token ids)")
    ids = np.asarray(prompt_token_ids)
    if ids.dtype == np.bool_:
        raise ValueError("prompt_token_ids must be ints, got bool values (true/false are not token ids)")
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"prompt_token_ids must be a non-empty 1-D list of ints, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prompt_token_ids must be ints, got dtype {ids.dtype}")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        raise ValueError(f"prompt token {int(ids[bad[0]])} at index {int(bad[0])} is outside the vocabulary "
                         f"[0, {vocab_size})")
    return [int(t) for t in ids]


def check_request_id(request_id, in_use) -> None:
    """A str or an int (not a bool) that no dict of ``in_use`` holds."""
    if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
        raise ValueError(f"request_id must be a str or an int, got {request_id!r}")
    if any(request_id in table for table in in_use):
        raise ValueError(f"request_id {request_id!r} is already in use")


def check_stop_strings(stop: tuple[str, ...], max_stop_strings: int, max_stop_string_len: int) -> None:
    """At most ``max_stop_strings`` stop strings of at most ``max_stop_string_len`` characters (issue 21: their
    matcher's memory and build time grow with their total length)."""
    if len(stop) > max_stop_strings:
        raise ValueError(f"{len(stop)} stop strings: at most {max_stop_strings} per request (max_stop_strings)")
    longest = max((len(s) for s in stop), default=0)
    if longest > max_stop_string_len:
        raise ValueError(f"a stop string of {longest} characters is longer than {max_stop_string_len} "
                         f"(max_stop_string_len)")
