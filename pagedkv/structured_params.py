"""What a request's output must match: vLLM's ``StructuredOutputsParams`` (alias ``GuidedDecodingParams``).

Exactly one of ``json`` (a JSON schema: dict or JSON text), ``regex``, ``choice`` (a list of strings),
``grammar`` (Lark syntax, llguidance's dialect) or ``json_object=True`` (any JSON object). The grammar is
compiled when the request is added (:mod:`pagedkv.engine.runner.structured`); a schema that does not compile is
refused there with one line. No grammar library is imported here.
"""
from __future__ import annotations

import json as _json
from dataclasses import dataclass, fields

KINDS = ("json", "regex", "choice", "grammar", "json_object")


class StructuredOutputsError(ValueError):
    """A structured-output request that cannot be honoured (bad fields, or a grammar that does not compile)."""


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """vLLM's names. ``disable_any_whitespace``: JSON without optional whitespace (compact output);
    ``disable_additional_properties``: objects without ``additionalProperties`` get ``false``;
    ``whitespace_pattern``: a regex for JSON's whitespace (llguidance: the item separator's); ``backend``:
    None, ``"auto"`` or ``"guidance"`` (pagedkv's one backend, llguidance)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    backend: str | None = None

    def __post_init__(self):
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise StructuredOutputsError(f"structured_outputs needs exactly one of {', '.join(KINDS)}; got "
                                         f"{given or 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise StructuredOutputsError(f"structured_outputs.json must be a dict or JSON text, got "
                                         f"{type(self.json).__name__}")
        if isinstance(self.json, str):
            try:
                schema = _json.loads(self.json)
            except ValueError as exc:
                raise StructuredOutputsError(f"structured_outputs.json is not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise StructuredOutputsError("structured_outputs.json must be a JSON object (a schema)")
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise StructuredOutputsError(f"structured_outputs.{name} must be a non-empty str, got {value!r}")
        if self.choice is not None:
            choice = (self.choice,) if isinstance(self.choice, str) else self.choice
            try:
                choice = tuple(choice)
            except TypeError:
                raise StructuredOutputsError(f"structured_outputs.choice must be a list of strings, got "
                                             f"{self.choice!r}") from None
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise StructuredOutputsError(f"structured_outputs.choice must be non-empty strings, got {choice!r}")
            object.__setattr__(self, "choice", choice)
        for name in ("json_object", "disable_fallback", "disable_any_whitespace", "disable_additional_properties"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise StructuredOutputsError(f"structured_outputs.{name} must be a bool, got {value!r}")
        if self.backend not in (None, "auto", "guidance", "llguidance"):
            raise StructuredOutputsError(f"structured_outputs.backend {self.backend!r} is not available: pagedkv "
                                         f"uses llguidance ('guidance')")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """A canonical text of everything that shapes the grammar (the compile cache's key)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "backend"}
        if isinstance(d["json"], str):
            d["json"] = _json.loads(d["json"])
        return _json.dumps(d, sort_keys=True, default=list)

    @classmethod
    def coerce(cls, value, name: str) -> StructuredOutputsParams | None:
        """``value`` as params: None, an instance, or a dict of its fields (unknown keys refused)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise StructuredOutputsError(f"{name} has unknown field(s) {sorted(unknown)}")
            return cls(**value)
        raise StructuredOutputsError(f"{name} must be a StructuredOutputsParams or a dict, got {type(value).__name__}")


GuidedDecodingParams = StructuredOutputsParams  # vLLM's older name (same fields)
