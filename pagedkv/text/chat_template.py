"""Chat templates rendered the way Hugging Face ``apply_chat_template`` renders them.

The environment matches transformers' ``_compile_jinja_template``: a sandboxed, immutable jinja2 environment
with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` block tag
(rendered as its body), the ``tojson`` filter without HTML escaping, and the globals ``raise_exception`` and
``strftime_now``. The template sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the
tokenizer's special tokens (``bos_token``, ``eos_token``, ...) and any extra keyword arguments.

A checkpoint's template is untrusted code (issue 21): a render runs under a :class:`RenderLimits` budget,
checked inside the sandbox's hooks — every ``range`` item, call, filter and ``*`` / ``**`` / ``%`` / ``+``
operation checks the deadline and an iteration cap, operators and filters refuse results beyond the output
cap, and the output is streamed and cut at the cap. A render over budget raises :class:`ChatTemplateError`
naming the limit. NOTE: a single built-in operation on small values is not interrupted (a filter's own loop);
every loop the template writes is. Messages are checked first (dicts with a string role, content a string, a
list of parts or None, ``tool_calls`` a list, strings valid UTF-8, nesting bounded): a problem names the message
index, and a template error is traced to the first message whose prefix fails.
"""
from __future__ import annotations

import contextvars
import datetime
import functools
import json
import time
from dataclasses import dataclass

from .extras import require

# NOTE: keyword names the renderer itself takes; a chat_template_kwargs key among them is a caller's mistake
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "documents", "add_generation_prompt", "special_tokens", "source",
                            "self", "chat_template", "tokenize", "continue_final_message", "limits")
MAX_MESSAGE_DEPTH = 32  # nesting of dicts/lists inside one message


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """Budget of one render: wall time, loop iterations + calls + operations, output characters."""

    max_seconds: float = 2.0
    max_steps: int = 2_000_000
    max_output_chars: int = 1 << 20


class ChatTemplateError(ValueError):
    """A template raised (``raise_exception``) or failed to render: the caller's messages do not fit it."""


class TemplateLimitError(ChatTemplateError):
    """A render went over its :class:`RenderLimits` (time, steps or output size)."""


def _over_cap(args, kwargs, cap: int) -> bool:
    return any(isinstance(a, int) and not isinstance(a, bool) and abs(a) > cap for a in (*args, *kwargs.values()))


class _Budget:
    def __init__(self, limits: RenderLimits):
        self.limits, self.steps = limits, 0
        self.deadline = time.monotonic() + limits.max_seconds

    def tick(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.limits.max_steps:
            raise TemplateLimitError(f"chat template exceeded its limit of {self.limits.max_steps} steps "
                                    "(loop iterations, calls, operations)")
        if not self.steps & 63 and time.monotonic() > self.deadline:
            raise TemplateLimitError(f"chat template exceeded its time limit of {self.limits.max_seconds} s")

    def size(self, value) -> None:
        if isinstance(value, (str, list, tuple, bytes)) and len(value) > self.limits.max_output_chars:
            raise TemplateLimitError(f"chat template built a value of {len(value)} items, over the output limit of "
                                    f"{self.limits.max_output_chars}")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("pagedkv_template_budget", default=None)


def _tick() -> _Budget | None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.tick()
    return budget


def _counted_range(*args):
    budget = _tick()
    n = len(range(*args))
    if budget is not None and n > budget.limits.max_steps:
        raise TemplateLimitError(f"chat template asked for range({', '.join(map(str, args))}), over its limit of "
                                f"{budget.limits.max_steps} steps")
    for i in range(*args):
        if budget is not None:
            budget.tick()
        yield i


def _limited_filter(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # NOTE: also called at compile time (constant folding), where no budget is set: the default caps apply
        budget = _tick() or _Budget(RenderLimits())
        cap = budget.limits.max_output_chars
        if _over_cap(args[1:], kwargs, cap):
            raise TemplateLimitError(f"chat template passed a filter an argument over the output limit of {cap}")
        out = fn(*args, **kwargs)
        budget.size(out)
        return out
    return wrapper


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

    from jinja2.compiler import CodeGenerator

    class LimitedCodeGenerator(CodeGenerator):
        """``a ~ b`` through ``environment.checked_concat`` (jinja2 joins it with a plain ``str.join``)."""

        def visit_Concat(self, node, frame):
            self.write("environment.checked_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        """Every call, ``~`` and ``* ** % +`` goes through the render's budget (no constant folding of them)."""

        intercepted_binops = frozenset(["*", "**", "%", "+"])
        code_generator_class = LimitedCodeGenerator

        def call(self, __context, __obj, *args, **kwargs):
            budget = _tick()
            if budget is not None and _over_cap(args, kwargs, budget.limits.max_output_chars):
                raise TemplateLimitError("chat template passed a call an argument over the output limit of "
                                         f"{budget.limits.max_output_chars}")
            return super().call(__context, __obj, *args, **kwargs)

        def checked_concat(self, parts):
            budget = _tick() or _Budget(RenderLimits())
            out = "".join(map(str, parts))
            budget.size(out)
            return out

        def call_binop(self, context, operator, left, right):
            budget = _tick()
            if budget is not None:
                cap = budget.limits.max_output_chars
                if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64 and abs(left) > 1:
                    raise TemplateLimitError("chat template computed a power over its limit (exponent > 64)")
                if operator == "*" and any(isinstance(a, (str, list, tuple)) and len(a) > 0 for a in (left, right)):
                    seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
                    if isinstance(n, int) and len(seq) * max(n, 0) > cap:
                        raise TemplateLimitError(f"chat template repeated a value past the output limit of {cap}")
            out = super().call_binop(context, operator, left, right)
            if budget is not None:
                budget.size(out)
            return out

    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.globals["range"] = _counted_range
    env.globals.pop("lipsum", None)  # NOTE: lipsum(n) writes n paragraphs; no chat template needs it
    env.filters["tojson"] = _tojson
    for name in list(env.filters):
        env.filters[name] = _limited_filter(env.filters[name])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template syntax error (line {exc.lineno}): {exc.message}") from exc


def render_chat_template(source: str, messages, *, add_generation_prompt: bool = True, tools=None,
                         documents=None, special_tokens: dict | None = None, continue_final_message: bool = False,
                         limits: RenderLimits | None = None, **kwargs) -> str:
    """Render one conversation.

    Args:
        source: the template's jinja2 text.
        messages: a list of ``{"role": ..., "content": ...}`` dicts.
        special_tokens: ``{"bos_token": "<s>", "eos_token": "</s>", ...}`` (template variables).
        continue_final_message: cut the text right after the last message's content (its end-of-turn tokens
            dropped) so the model continues it; needs ``add_generation_prompt=False``.
        limits: the render's budget (default :class:`RenderLimits`).
        kwargs: more template variables (``enable_thinking``, a date...); they override ``special_tokens``.
    Raises:
        ChatTemplateError: malformed messages (naming the index), a reserved or bad keyword, the template refused
            them (its ``raise_exception``) or failed, or the render went over its limits.
    """
    require("jinja2", "chat templates")
    _check_messages(messages)
    check_template_kwargs(kwargs)
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be true")
    template = compile_chat_template(source)
    variables = {**(special_tokens or {}), **kwargs,
                 "tools": tools, "documents": documents, "add_generation_prompt": add_generation_prompt}
    limits = limits or RenderLimits()
    try:
        text = _render(template, messages, variables, limits)
    except TemplateLimitError:
        raise
    except ChatTemplateError as exc:
        raise ChatTemplateError(f"{exc}{_failing_message(template, messages, variables, limits)}") from None
    return _continue_final(text, messages) if continue_final_message else text


def check_template_kwargs(kwargs: dict) -> None:
    """Template variables must be named by strings that the renderer does not take itself."""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ChatTemplateError(f"chat_template_kwargs must be a dict with string keys, got {kwargs!r:.80}")
    reserved = sorted(set(kwargs) & set(RESERVED_TEMPLATE_KWARGS))
    if reserved:
        raise ChatTemplateError(f"chat_template_kwargs may not set {reserved}: reserved names of the renderer")


def _render(template, messages, variables: dict, limits: RenderLimits) -> str:
    jinja2 = require("jinja2", "chat templates")
    budget = _Budget(limits)
    token = _BUDGET.set(budget)
    parts, size = [], 0
    try:
        for chunk in template.generate(messages=messages, **variables):
            size += len(chunk)
            if size > limits.max_output_chars:
                raise TemplateLimitError(f"chat template output exceeded its limit of {limits.max_output_chars} "
                                        "characters")
            budget.tick()
            parts.append(chunk)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template: {exc}") from exc
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError,
            RecursionError, UnicodeError) as exc:
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
    finally:
        _BUDGET.reset(token)
    return "".join(parts)


def _failing_message(template, messages, variables: dict, limits: RenderLimits) -> str:
    """`` (at message i)``: the first message whose prefix of the conversation fails to render, else ""."""
    if len(messages) > 64:
        return ""
    for i in range(len(messages)):
        try:
            _render(template, messages[:i + 1], variables, limits)
        except ChatTemplateError:
            return f" (at message {i})"
    return ""


def _continue_final(text: str, messages) -> str:
    """The rendered text cut after the final message's content (transformers' ``continue_final_message``)."""
    content = messages[-1].get("content")
    if isinstance(content, (list, tuple)):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    final = (content or "").strip()
    at = text.rfind(final) if final else -1
    if at < 0:
        raise ChatTemplateError("continue_final_message: the final message's content is not in the rendered text")
    return text[:at + len(final)]


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError(f"messages must be a non-empty list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"message {i} must be a dict with a string 'role', got {m!r:.80}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list, tuple)):
            raise ChatTemplateError(f"message {i}: content must be a string, a list of parts or null, "
                                    f"got {type(content).__name__}")
        tool_calls = m.get("tool_calls")
        if tool_calls is not None and not (isinstance(tool_calls, (list, tuple)) and
                                           all(isinstance(t, dict) for t in tool_calls)):
            raise ChatTemplateError(f"message {i}: tool_calls must be a list of objects, got {tool_calls!r:.80}")
        _check_values(m, i)


def _check_values(message, index: int) -> None:
    """Every string valid UTF-8 (no lone surrogate), keys strings, nesting at most ``MAX_MESSAGE_DEPTH``."""
    stack = [(message, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_MESSAGE_DEPTH:
            raise ChatTemplateError(f"message {index} is nested deeper than {MAX_MESSAGE_DEPTH} levels")
        if isinstance(value, str):
            check_utf8(value, f"message {index}")
        elif isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise ChatTemplateError(f"message {index}: keys must be strings, got {k!r:.40}")
                check_utf8(k, f"message {index}")
                stack.append((v, depth + 1))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)


def check_utf8(text: str, where: str) -> None:
    """``ValueError`` naming ``where`` when ``text`` holds a lone surrogate (not encodable as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ChatTemplateError(f"{where} is not valid UTF-8: a lone surrogate {text[exc.start]!r} at character "
                                f"{exc.start}") from None
