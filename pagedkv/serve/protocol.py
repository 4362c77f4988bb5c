"""OpenAI request bodies (pydantic) and their translation to :class:`~pagedkv.engine.SamplingParams`.

Fields follow the OpenAI API (``/v1/completions``, ``/v1/chat/completions``) plus vLLM's extras (``top_k``,
``min_p``, ``ignore_eos``, ``stop_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens``).
Unknown fields are ignored, as the OpenAI server does; options this engine cannot honour (``echo``,
``suffix``, penalties, ``logit_bias``, tools, JSON mode) are refused with a 400 naming the field.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..sampling_params import MAX_LOGPROBS, SamplingParams


class OpenAIError(Exception):
    """An error answered as OpenAI's JSON ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise OpenAIError(f"{name} is not supported by this server (must be 0)", param=name)
        if self.logit_bias:
            raise OpenAIError("logit_bias is not supported by this server", param="logit_bias")

    def sampling_params(self, defaults: SamplingParams, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's parameters: the request's fields over the checkpoint's defaults.

        Raises:
            OpenAIError: a field out of range (status 400, ``param`` names it).
        """
        fields = dict(n=self.n, max_tokens=max_tokens, seed=self.seed, logprobs=logprobs, ignore_eos=self.ignore_eos,
                      stop=() if self.stop is None else self.stop, stop_token_ids=tuple(self.stop_token_ids or ()),
                      include_stop_str_in_output=self.include_stop_str_in_output,
                      skip_special_tokens=self.skip_special_tokens)
        for name in ("temperature", "top_p", "top_k", "min_p"):
            value = getattr(self, name)
            fields[name] = getattr(defaults, name) if value is None else value
        try:
            return SamplingParams(**fields)
        except ValueError as exc:
            param = str(exc).split(" ", 1)[0]
            raise OpenAIError(str(exc), param=param if param in fields else None) from None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise OpenAIError("echo is not supported by this server", param="echo")
        if self.suffix:
            raise OpenAIError("suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError(f"best_of must equal n here (no best-of ranking), got {self.best_of}", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise OpenAIError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", param="logprobs")

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (a string, or token ids)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p or any(not x for x in p):
            raise OpenAIError("prompt must not be empty", param="prompt")
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[dict], None] = None

    def as_template_dict(self) -> dict:
        """The message as a chat template sees it: text parts joined into one string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise OpenAIError(f"only text content parts are supported, got type {part.get('type')!r}",
                                      param="messages")
                texts.append(part["text"])
            message["content"] = "\n".join(texts)
        elif self.content is None:
            message["content"] = ""
        return message


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Union[str, dict, None] = None
    # vLLM's extras
    add_generation_prompt: bool = True
    chat_template_kwargs: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise OpenAIError("response_format other than text is not supported", param="response_format")
        if self.tools:
            raise OpenAIError("tools are not supported by this server", param="tools")
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


Endpoint = Literal["completions", "chat"]
