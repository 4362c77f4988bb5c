"""Chat templates rendered the way Hugging Face ``apply_chat_template`` renders them.

The environment matches transformers' ``_compile_jinja_template``: a sandboxed, immutable jinja2 environment
with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` block tag
(rendered as its body), the ``tojson`` filter without HTML escaping, and the globals ``raise_exception`` and
``strftime_now``. The template sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the
tokenizer's special tokens (``bos_token``, ``eos_token``, ...) and any extra keyword arguments.
"""
from __future__ import annotations

import datetime
import functools
import json

from .extras import require


class ChatTemplateError(ValueError):
    """A template raised (``raise_exception``) or failed to render: the caller's messages do not fit it."""


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # NOTE: jinja2's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _raise_exception(message):
    jinja2 = require("jinja2", "chat templates")
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str):
    """A compiled jinja2 template (cached by source). Syntax errors raise :class:`ChatTemplateError`."""
    jinja2 = require("jinja2", "chat templates")
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template syntax error (line {exc.lineno}): {exc.message}") from exc


def render_chat_template(source: str, messages, *, add_generation_prompt: bool = True, tools=None,
                         documents=None, special_tokens: dict | None = None, **kwargs) -> str:
    """Render one conversation.

    Args:
        source: the template's jinja2 text.
        messages: a list of ``{"role": ..., "content": ...}`` dicts.
        special_tokens: ``{"bos_token": "<s>", "eos_token": "</s>", ...}`` (template variables).
        kwargs: more template variables (``enable_thinking``, a date...); they override ``special_tokens``.
    Raises:
        ChatTemplateError: malformed messages, or the template refused them (its ``raise_exception``).
    """
    jinja2 = require("jinja2", "chat templates")
    _check_messages(messages)
    template = compile_chat_template(source)
    variables = {**(special_tokens or {}), **kwargs}
    try:
        return template.render(messages=messages, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template: {exc}") from exc


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError(f"messages must be a non-empty list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"message {i} must be a dict with a string 'role', got {m!r}")
