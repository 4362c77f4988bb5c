"""Checks of what callers hand the engine, each raising ``ValueError`` naming the bad value."""
from __future__ import annotations

import numpy as np


def check_prompt(prompt_token_ids, vocab_size: int) -> list[int]:
    """A non-empty 1-D sequence of ints in ``[0, vocab_size)``, as a new list of Python ints (a copy: the caller
    may change its own list afterwards)."""
    ids = np.asarray(prompt_token_ids)
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
