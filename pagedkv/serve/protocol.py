"""OpenAI request bodies (pydantic) and their translation to :class:`~pagedkv.engine.SamplingParams`.

Fields follow the OpenAI API (``/v1/completions``, ``/v1/chat/completions``) plus vLLM's extras (``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``,
``include_stop_str_in_output``, ``skip_special_tokens``, ``chat_template_kwargs``). Unknown fields are ignored,
as the OpenAI server does. The penalties, ``logit_bias``, ``min_tokens`` and ``response_format`` map onto
SamplingParams fields of the same (vLLM) names; a value this build's SamplingParams cannot carry is a 400
naming the field, never ignored. ``tools`` and ``suffix`` are refused with a 400.
"""
from __future__ import annotations

import sys
from dataclasses import fields as dataclass_fields
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from ..sampling_params import MAX_LOGPROBS, SamplingParams
from .body_checks import check_fan_out, check_prompt_shape
from .errors import OpenAIError
from .limits import ServerLimits

NEUTRAL = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_tokens": 0,
           "logit_bias": None}


def sampling_params_fields() -> frozenset[str]:
    return frozenset(f.name for f in dataclass_fields(SamplingParams))


def structured_output(kind: str, schema=None):
    """``(field name, value)`` of SamplingParams for JSON output: vLLM's ``structured_outputs``
    (``StructuredOutputsParams(json=schema | json_object=True)``) or its older ``guided_decoding``.

    Raises:
        OpenAIError: this build's SamplingParams has neither.
    """
    module, names = sys.modules[SamplingParams.__module__], sampling_params_fields()
    for field, cls_name in (("structured_outputs", "StructuredOutputsParams"),
                            ("guided_decoding", "GuidedDecodingParams")):
        cls = getattr(module, cls_name, None)
        if field in names and cls is None:
            cls = _import_param_class(cls_name)
        if field in names and cls is not None:
            param = "structured_outputs" if kind == "structured_outputs" else "response_format"
            try:
                if kind == "structured_outputs":  # vLLM's extra field: StructuredOutputsParams' own fields
                    return field, cls(**schema)
                return field, cls(json_object=True) if kind == "json_object" else cls(json=schema)
            except (TypeError, ValueError) as exc:
                raise OpenAIError(f"{param}: {exc}", param=param) from None
    raise OpenAIError(f"{kind!r} needs structured output, which this server's build lacks",
                      param="structured_outputs" if kind == "structured_outputs" else "response_format")


def _import_param_class(name: str):
    import importlib

    for module in ("pagedkv.sampling_params", "pagedkv.structured_params", "pagedkv.engine.structured",
                   "pagedkv.structured"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if cls is not None:
            return cls
    return None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: StrictInt = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: StrictInt | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: dict | None = None
    # vLLM's extras
    structured_outputs: dict | None = None  # StructuredOutputsParams fields: json, regex, choice, grammar, ...
    top_k: StrictInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: StrictInt | None = None
    ignore_eos: bool = False
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def check_limits(self, limits: ServerLimits, num_prompts: int) -> None:
        """Per-request caps (prompts x n, stop strings): a 400 naming the limit."""
        check_fan_out(num_prompts, self.n, limits)
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if len(stops) > limits.max_stop_strings:
            raise OpenAIError(f"{len(stops)} stop strings exceed this server's limit of {limits.max_stop_strings} "
                              f"(--max-stop-strings)", param="stop")
        longest = max((len(s) for s in stops), default=0)
        if longest > limits.max_stop_string_len:
            raise OpenAIError(f"a stop string of {longest} characters exceeds this server's limit of "
                              f"{limits.max_stop_string_len} (--max-stop-string-len)", param="stop")

    def refuse_unsupported(self) -> None:
        """Options this server cannot honour at all (before any tokenizing)."""

    def _vllm_fields(self) -> dict:
        """The penalties, logit_bias, min_tokens and response_format as SamplingParams fields (vLLM's names)."""
        out = {}
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.logit_bias:
            try:
                out["logit_bias"] = {int(k): float(v) for k, v in self.logit_bias.items()}
            except ValueError:
                raise OpenAIError("logit_bias keys must be token ids (integers as strings)",
                                  param="logit_bias") from None
        fmt = self.response_format
        if self.structured_outputs is not None:
            if fmt is not None and fmt.get("type", "text") != "text":
                raise OpenAIError("give response_format or structured_outputs, not both", param="structured_outputs")
            out.update([structured_output("structured_outputs", self.structured_outputs)])
        if fmt is not None:
            kind = fmt.get("type", "text")
            if kind == "json_object":
                out.update([structured_output("json_object")])
            elif kind == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                    raise OpenAIError("response_format json_schema needs {'json_schema': {'name', 'schema': {...}}}",
                                      param="response_format")
                out.update([structured_output("json_schema", spec["schema"])])
            elif kind != "text":
                raise OpenAIError(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                                  param="response_format")
        return out

    def sampling_params(self, defaults: SamplingParams, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's parameters: the request's fields over the checkpoint's defaults.

        Raises:
            OpenAIError: a field out of range, or one this build cannot carry (status 400, ``param`` names it).
        """
        fields = dict(n=self.n, max_tokens=max_tokens, seed=self.seed, logprobs=logprobs, ignore_eos=self.ignore_eos,
                      stop=() if self.stop is None else self.stop, stop_token_ids=tuple(self.stop_token_ids or ()),
                      include_stop_str_in_output=self.include_stop_str_in_output,
                      skip_special_tokens=self.skip_special_tokens)
        for name in ("temperature", "top_p", "top_k", "min_p"):
            value = getattr(self, name)
            fields[name] = getattr(defaults, name) if value is None else value
        known = sampling_params_fields()
        for name, value in self._vllm_fields().items():
            if name in known:
                fields[name] = value
            elif value != NEUTRAL.get(name):
                raise OpenAIError(f"{name} is not supported by this server's build", param=name)
        try:
            return SamplingParams(**fields)
        except (TypeError, ValueError) as exc:
            param = str(exc).split(" ", 1)[0]
            raise OpenAIError(str(exc), param=param if param in fields else None) from None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: StrictInt | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, p):
        return check_prompt_shape(p)

    def refuse_unsupported(self) -> None:
        if self.suffix:
            raise OpenAIError("suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError(f"best_of must equal n here (no best-of ranking), got {self.best_of}", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise OpenAIError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", param="logprobs")
        if self.echo and self.logprobs is not None:
            raise OpenAIError("echo with logprobs is not supported by this server", param="echo")

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (a string, or token ids)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            if not p:
                raise OpenAIError("prompt must not be empty", param="prompt")
            return [p]
        if not p or any(not x for x in p):
            raise OpenAIError("prompt must not be empty", param="prompt")
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[dict], None] = None

    def as_template_dict(self, index: int) -> dict:
        """The message as a chat template sees it: text parts joined into one string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise OpenAIError(f"messages[{index}]: only text content parts are supported, got type "
                                      f"{part.get('type')!r}", param="messages")
                texts.append(part["text"])
            message["content"] = "\n".join(texts)
        elif self.content is None:
            message["content"] = ""
        return message


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: bool = False
    top_logprobs: StrictInt | None = None
    tools: list | None = None
    tool_choice: Union[str, dict, None] = None
    # vLLM's extras
    add_generation_prompt: bool = True
    chat_template_kwargs: dict | None = None

    def refuse_unsupported(self) -> None:
        if self.tools:
            raise OpenAIError("tools are not supported by this server (no tool-call parser); send the tool "
                              "descriptions in a system message instead", param="tools")
        if self.tool_choice not in (None, "none"):
            raise OpenAIError("tool_choice is not supported by this server", param="tool_choice")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise OpenAIError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                                  param="top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: a prompt, or chat messages rendered by the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[StrictInt]


Endpoint = Literal["completions", "chat"]
