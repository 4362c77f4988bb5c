"""A checkpoint's tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, plus ``tokenizer_config.json``
(special tokens, ``add_bos_token``, the chat template) as Hugging Face's fast tokenizers read them.

::

    folder/tokenizer.json            the model: normalizer, pre-tokenizer, BPE/Unigram/WordPiece, decoder,
                                     post-processor, added tokens
    folder/tokenizer_config.json     bos/eos/unk/pad tokens (a string or {"content": ...}), add_bos_token,
                                     chat_template (a string, or a list of {"name", "template"})
    folder/chat_template.jinja       the chat template in a file of its own (newer transformers), preferred
"""
from __future__ import annotations

import json
from pathlib import Path

from .chat_template import ChatTemplateError, render_chat_template
from .extras import require

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: ``"<s>"``, ``{"content": "<s>", ...}`` or null."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"a special token must be a string or {{'content': str}}, got {value!r}")
    return value


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _chat_templates(value) -> dict[str, str]:
    """``chat_template`` of tokenizer_config.json as ``{name: source}`` (a single string is ``"default"``)."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str) and
                                       isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ValueError(f"chat_template must be a string or a list of {{'name', 'template'}}, got {value!r:.80}")


class Tokenizer:
    """Encode text to token ids and back, and render chat templates.

    Args:
        backend: a ``tokenizers.Tokenizer``.
        config: the contents of ``tokenizer_config.json`` (may be empty).
        chat_templates: ``{name: jinja2 source}``; ``"default"`` is used unless a call names another.
    """

    def __init__(self, backend, config: dict | None = None, chat_templates: dict[str, str] | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self.chat_templates = dict(chat_templates if chat_templates is not None else
                                   _chat_templates(self.config.get("chat_template")))
        self.special_tokens = {name: _token_content(self.config.get(name)) for name in SPECIAL_NAMES}
        extra = self.config.get("additional_special_tokens") or []
        self.additional_special_tokens = [_token_content(t) for t in extra]
        self.add_bos_token = self.config.get("add_bos_token")  # None: as tokenizer.json's post-processor does
        if self.add_bos_token is not None and not isinstance(self.add_bos_token, bool):
            raise ValueError(f"add_bos_token must be a bool, got {self.add_bos_token!r}")
        for name, token in self.special_tokens.items():
            if token is not None and self.backend.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} of tokenizer_config.json is not in the tokenizer's vocabulary")
        bos = self.bos_token_id
        self._post_processor_adds_bos = bos is not None and \
            self.backend.encode("", add_special_tokens=True).ids[:1] == [bos]

    @classmethod
    def from_folder(cls, folder) -> Tokenizer:
        """The tokenizer of a Hugging Face checkpoint folder (needs ``tokenizer.json``)."""
        tokenizers = require("tokenizers", "loading a tokenizer")
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"{folder} has no tokenizer.json (only fast tokenizers are supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # NOTE: tokenizers raises its own Exception type for a malformed file
            raise ValueError(f"{folder / 'tokenizer.json'} could not be read: {exc}") from exc
        config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        templates = _chat_templates(config.get("chat_template"))
        if (folder / "chat_template.jinja").is_file():
            templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, config, templates)

    # ------------------------------------------------------------------------------------------ tokens
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens, ``additional_special_tokens`` and added tokens flagged special."""
        ids = {self.backend.token_to_id(t) for t in [*self.special_tokens.values(), *self.additional_special_tokens]
               if t is not None}
        ids |= {i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special}
        return sorted(i for i in ids if i is not None)

    # ----------------------------------------------------------------------------------- encode/decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor and ``add_bos_token``."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._fix_bos(self.backend.encode(text, add_special_tokens=add_special_tokens).ids, add_special_tokens)

    def encode_off_gil(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None):
        """:meth:`encode`, but the work runs with the GIL released (``tokenizers``' batch path), so another
        thread calling it does not stall this process's other threads. Returns None (no id list built) when the
        text has more than ``max_tokens`` tokens."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        encoding = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        if max_tokens is not None and len(encoding) > max_tokens + 1:  # NOTE: +1: a BOS add_bos_token may drop
            return None
        return self._fix_bos(encoding.ids, add_special_tokens)

    def _fix_bos(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if add_special_tokens and self.add_bos_token is not None and self.bos_token_id is not None:
            # NOTE: tokenizer.json's post-processor adds the BOS or not; tokenizer_config.json's add_bos_token
            # overrides it (as transformers' Llama tokenizers rebuild their post-processor)
            if self.add_bos_token and not self._post_processor_adds_bos:
                ids = [self.bos_token_id] + ids
            elif not self.add_bos_token and self._post_processor_adds_bos:
                ids = ids[1:]
        return ids

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``; a byte sequence cut mid-character ends in U+FFFD."""
        return self.backend.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's text as a stand-alone string (special tokens included), for logprobs."""
        return self.backend.decode([int(token_id)], skip_special_tokens=False)

    # -------------------------------------------------------------------------------------------- chat
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, *, chat_template: str | None = None,
                            tokenize: bool = False, tools=None, documents=None, **kwargs):
        """Render ``messages`` with the checkpoint's chat template, as transformers' ``apply_chat_template``.

        Args:
            chat_template: a template name (of a list of named templates) or jinja2 source; default "default"
                (or the only template).
            tokenize: return token ids (the rendered text encoded without adding special tokens: the template
                writes them itself) instead of the text.
            kwargs: extra template variables.
        Raises:
            ValueError: no chat template, malformed messages, or the template refused them.
        """
        source = self._template_source(chat_template)
        variables = {k: v for k, v in self.special_tokens.items() if v is not None}
        variables["additional_special_tokens"] = self.additional_special_tokens
        text = render_chat_template(source, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                    documents=documents, special_tokens=variables, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _template_source(self, name: str | None) -> str:
        if name is not None and name not in self.chat_templates:
            if "{" in name:  # jinja2 source given directly
                return name
            raise ChatTemplateError(f"no chat template named {name!r}; this tokenizer has "
                                    f"{sorted(self.chat_templates)}")
        if name is None:
            if not self.chat_templates:
                raise ChatTemplateError("this tokenizer has no chat template (tokenizer_config.json 'chat_template' "
                                        "or chat_template.jinja)")
            name = "default" if "default" in self.chat_templates or len(self.chat_templates) != 1 else \
                next(iter(self.chat_templates))
            if name not in self.chat_templates:
                raise ChatTemplateError(f"no default chat template; name one of {sorted(self.chat_templates)}")
        return self.chat_templates[name]
