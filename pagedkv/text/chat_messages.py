"""Conversations as vLLM's ``LLM.chat`` takes them: content strings or OpenAI content parts, rendered by the
chat template with every option honoured.

Content parts ``[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]`` become ``"a\\nb"`` (vLLM's
"string" content format, the default for templates that expect a string); ``content_format="openai"`` hands
the parts to the template as they are. A non-text part (an image, audio...) is refused: pagedkv has no
multi-modal model.
"""
from __future__ import annotations

from .chat_template import ChatTemplateError, check_template_kwargs

CONTENT_FORMATS = ("auto", "string", "openai")


def conversations_of(messages) -> list[list[dict]]:
    """One conversation (a list of message dicts) or a list of them, as a list of conversations."""
    if isinstance(messages, (list, tuple)) and messages and all(isinstance(m, dict) for m in messages):
        return [list(messages)]
    if isinstance(messages, (list, tuple)) and messages and \
            all(isinstance(c, (list, tuple)) and c and all(isinstance(m, dict) for m in c) for c in messages):
        return [list(c) for c in messages]
    raise ChatTemplateError("messages must be a conversation (a list of {'role', 'content'} dicts) or a list of "
                            f"them, got {messages!r:.80}")


def normalize_content(conversation: list[dict], content_format: str = "auto") -> list[dict]:
    """A copy with each message's content parts joined (``"string"``/``"auto"``) or checked (``"openai"``)."""
    if content_format not in CONTENT_FORMATS:
        raise ChatTemplateError(f"chat_template_content_format must be one of {CONTENT_FORMATS}, "
                                f"got {content_format!r}")
    out = []
    for i, m in enumerate(conversation):
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            texts = _text_parts(content, i)
            m = {**m, "content": list(content) if content_format == "openai" else "\n".join(texts)}
        out.append(m)
    return out


def _text_parts(parts, index: int) -> list[str]:
    texts = []
    for j, part in enumerate(parts):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise ChatTemplateError(f"message {index}: content part {j} must be an object, got {part!r:.60}")
        kind = part.get("type", "text" if "text" in part else None)
        if kind != "text":
            raise ChatTemplateError(f"message {index}: content part {j} has type {kind!r}; pagedkv takes text parts "
                                    "only ({'type': 'text', 'text': ...})")
        if not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"message {index}: content part {j} needs a string 'text'")
        texts.append(part["text"])
    return texts


def render_conversation(tokenizer, conversation, *, chat_template=None, content_format="auto",
                        add_generation_prompt=True, continue_final_message=False, tools=None,
                        chat_template_kwargs=None) -> str:
    """The prompt text of one conversation (the template writes the special tokens itself)."""
    for name, value in (("add_generation_prompt", add_generation_prompt),
                        ("continue_final_message", continue_final_message)):
        if not isinstance(value, bool):
            raise ChatTemplateError(f"{name} must be a bool, got {value!r}")
    kwargs = {} if chat_template_kwargs is None else chat_template_kwargs
    check_template_kwargs(kwargs)
    if chat_template is not None and not isinstance(chat_template, str):
        raise ChatTemplateError(f"chat_template must be a string (jinja2 source or a name), got "
                                f"{type(chat_template).__name__}")
    return tokenizer.apply_chat_template(normalize_content(conversation, content_format),
                                         add_generation_prompt=add_generation_prompt, chat_template=chat_template,
                                         continue_final_message=continue_final_message, tools=tools, **kwargs)
