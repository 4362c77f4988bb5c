"""Checks of a raw request body before the pydantic models see it, each cheap on a large body: JSON parsing with
lone surrogates refused, the fan-out cap (prompts x n) on the raw JSON, and the completion prompt's shape checked
in one pass. Each failure is an :class:`~pagedkv.serve.errors.OpenAIError` (a 400 naming the field)."""
from __future__ import annotations

import json
import re

from .errors import OpenAIError
from .limits import ServerLimits


def _find_surrogate(value, path: str) -> str | None:
    """The path of the first string holding a lone UTF-16 surrogate (it cannot be encoded as UTF-8)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(value, dict):
        for k, v in value.items():
            if (found := _find_surrogate(k, path) or _find_surrogate(v, f"{path}.{k}")) is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if (found := _find_surrogate(v, f"{path}[{i}]")) is not None:
                return found
    return None


SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


def parse_json_body(raw: bytes):
    """The JSON of a request body. A lone UTF-16 surrogate (it cannot be encoded as UTF-8) can only arrive as
    a ``\\uD800``-style escape: the raw bytes are searched for one (C speed) and only then is the parsed body
    walked (a surrogate pair is fine).

    Raises:
        OpenAIError: not JSON, or a string with a lone surrogate (400, ``param`` names the field).
    """
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise OpenAIError("the request body is not valid JSON") from None
    if SURROGATE_ESCAPE.search(raw):
        path = _find_surrogate(data, "body")
        if path is not None:
            field = path[5:].split(".")[0].split("[")[0] or None
            raise OpenAIError(f"{path[5:] or 'body'} holds a lone UTF-16 surrogate (not valid Unicode text)",
                              param=field)
    return data


def check_fan_out(num_prompts: int, n: int, limits: ServerLimits) -> None:
    choices = num_prompts * n
    if choices > limits.max_choices_per_request:
        raise OpenAIError(f"{num_prompts} prompt(s) x n={n} = {choices} choices exceeds this server's limit of "
                          f"{limits.max_choices_per_request} per request (--max-choices-per-request)",
                          param="n" if num_prompts == 1 else "prompt")


def early_fan_out_check(data, limits: ServerLimits) -> None:
    """:func:`check_fan_out` on the parsed JSON, before the (costlier) validation of every prompt."""
    if not isinstance(data, dict) or type(data.get("n", 1)) is not int:
        return
    p = data.get("prompt")
    num = len(p) if isinstance(p, list) and p and isinstance(p[0], (list, str)) else 1
    check_fan_out(num, data.get("n", 1), limits)


def _is_id(x) -> bool:
    return type(x) is int  # NOTE: not bool (True is an int to isinstance)


def check_prompt_shape(p):
    """A string, token ids, a list of strings or a list of token-id lists. Checked by hand in one pass: a
    pydantic Union would try each member in turn and collect an error per element of each failed one (a
    2,000-prompt body took 28 ms of the event loop)."""
    if isinstance(p, str):
        return p
    if not isinstance(p, list):
        raise ValueError("prompt must be a string, a list of token ids, a list of strings or a list of token-id lists")
    if all(_is_id(x) for x in p) or all(isinstance(x, str) for x in p):
        return p
    if all(isinstance(x, list) for x in p):
        for i, x in enumerate(p):
            if not all(_is_id(t) for t in x):
                raise ValueError(f"prompt[{i}] must be a list of token ids (ints, not booleans)")
        return p
    raise ValueError("prompt must be a string, a list of token ids (ints, not booleans), a list of strings or a list "
                     "of token-id lists")
