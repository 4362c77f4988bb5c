"""The server's per-request limits (flags ``--max-request-body-bytes`` ...), validated once at start.

Each bounds the work one request can cause before the engine sees it::

    max_request_body_bytes     413 before the body is parsed (Content-Length, or counted while it arrives)
    max_prompt_tokens          400 after tokenizing (default: max_model_len - 1; the context check follows)
    max_choices_per_request    400: prompts x n (one request cannot become millions of sequences)
    max_stop_strings,          400: stop-string matching costs about (longest stop x stops) per token
    max_stop_string_len
    chat_template_timeout_s    400 when rendering the chat template takes longer (it runs off the event loop)
    tokenize_timeout_s         503 when tokenizing takes longer (it runs off the event loop and the GIL)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_request_body_bytes: int = 4 * 2**20
    max_prompt_tokens: int | None = None
    max_choices_per_request: int = 256
    max_stop_strings: int = 64
    max_stop_string_len: int = 512
    chat_template_timeout_s: float = 5.0
    tokenize_timeout_s: float = 30.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "max_prompt_tokens" and value is None:
                continue
            if f.name.endswith("_s"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
                    value > 0
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            if not ok:
                raise ValueError(f"{f.name} must be a positive {'number' if f.name.endswith('_s') else 'int'}, "
                                 f"got {value!r}")
