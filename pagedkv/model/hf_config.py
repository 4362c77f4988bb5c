"""Hugging Face ``config.json`` → :class:`ModelConfig`, every field checked for type, range and finiteness.

A config is untrusted input: each number is checked before it is used, and a bad one raises ``ValueError``
naming the file and the field (never ``KeyError``, ``IndexError``, ``TypeError`` or ``ZeroDivisionError``).
Both transformers 4 (``rope_theta``, ``rope_scaling``, ``torch_dtype``) and transformers 5 (``rope_parameters``,
``dtype``) spellings are read.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from .config import ModelConfig

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
MAX_JSON_BYTES = 10_000_000
REQUIRED = object()
# NOTE: upper bounds of config.json's size fields, checked before anything is sized from them (a 10**9-layer
# config would otherwise build 10**9 expected names); each is far above any released Llama/Qwen2 model
MAX_SIZES = {"num_hidden_layers": 1024, "hidden_size": 65536, "intermediate_size": 1 << 20, "vocab_size": 1 << 22,
             "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1024,
             "max_position_embeddings": 1 << 24, "original_max_position_embeddings": 1 << 24}


def read_json_object(path: str | Path) -> dict:
    """A JSON object from a regular file of at most ``MAX_JSON_BYTES``; anything else raises ``ValueError``."""
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path}: must be a regular file of at most {MAX_JSON_BYTES} bytes")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{path}: not a valid UTF-8 JSON file ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(obj).__name__}")
    return obj


class Fields:
    """Typed, range-checked reads from one JSON object; errors name ``source`` and the key."""

    def __init__(self, obj: dict, source: str):
        self.obj, self.source = obj, source

    def fail(self, key: str, what: str, value):
        text = repr(value)
        raise ValueError(f"{self.source}: {key} must be {what}, got {text[:80]}")

    def get(self, key: str, default=REQUIRED):
        """The value of ``key``; absent or null gives ``default`` (or an error when it is required)."""
        value = self.obj.get(key)
        if value is None:
            if default is REQUIRED:
                raise ValueError(f"{self.source}: missing field {key!r}")
            return default
        return value

    def present(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def int(self, key: str, default=REQUIRED, *, lo: int = 1) -> int:
        if not self.present(key):
            return self.get(key, default)
        value = self.obj[key]
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)  # NOTE: 4096.0 is an int written by a float-happy tool; 4096.5 is not
        if type(value) is not int or value < lo:
            self.fail(key, f"an int >= {lo}", value)
        if key in MAX_SIZES and value > MAX_SIZES[key]:
            self.fail(key, f"at most {MAX_SIZES[key]} (pagedkv's cap on this size field)", value)
        return value

    def float(self, key: str, default=REQUIRED, *, lo: float = 0.0, lo_open: bool = True) -> float:
        if not self.present(key):
            return self.get(key, default)
        value = self.obj[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                (value <= lo if lo_open else value < lo):
            self.fail(key, f"a finite number {'>' if lo_open else '>='} {lo:g}", value)
        return float(value)

    def bool(self, key: str, default=REQUIRED) -> bool:
        if not self.present(key):
            return self.get(key, default)
        if not isinstance(self.obj[key], bool):
            self.fail(key, "true or false", self.obj[key])
        return self.obj[key]

    def str(self, key: str, default=REQUIRED) -> str:
        if not self.present(key):
            return self.get(key, default)
        if not isinstance(self.obj[key], str):
            self.fail(key, "a string", self.obj[key])
        return self.obj[key]


def architecture(f: Fields) -> str:
    """The supported architecture ``config.json`` names (``architectures[0]``, else ``model_type``)."""
    archs = f.obj.get("architectures")
    if archs is None:
        model_type = f.str("model_type", "?")
        arch = MODEL_TYPES.get(model_type, model_type)
    elif not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        f.fail("architectures", "a non-empty list of strings", archs)
    else:
        arch = archs[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{f.source}: unsupported architecture {arch!r}; supported: {ARCHITECTURES}")
    return arch


def rope(f: Fields) -> tuple[float, tuple | None]:
    """``(theta, llama3 scaling or None)`` from ``rope_theta`` / ``rope_scaling`` (transformers 4) or
    ``rope_parameters`` (transformers 5)."""
    params = f.get("rope_parameters", {})
    scaling = f.get("rope_scaling", None) or params
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            f.fail(key, "an object or null", value)
    theta = f.float("rope_theta") if f.present("rope_theta") else \
        Fields(params, f"{f.source}: rope_parameters").float("rope_theta", 10000.0)
    s = Fields(scaling, f"{f.source}: rope scaling")
    rope_type = s.get("rope_type", None) or s.get("type", "default")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"{f.source}: unsupported rope scaling type {rope_type!r} "
                         "(only 'default' and 'llama3' are implemented)")
    factor = s.float("factor", lo=1.0, lo_open=False)
    low, high = s.float("low_freq_factor"), s.float("high_freq_factor")
    if high <= low:  # NOTE: the smooth blend divides by (high - low)
        s.fail("high_freq_factor", f"> low_freq_factor ({low:g})", high)
    return theta, (factor, low, high, s.int("original_max_position_embeddings"))


def _unsupported(f: Fields) -> None:
    for key, ok in (("mlp_bias", not f.bool("mlp_bias", False)),
                    ("use_sliding_window", not f.bool("use_sliding_window", False)),
                    ("hidden_act", f.str("hidden_act", "silu") == "silu"),
                    ("partial_rotary_factor", f.float("partial_rotary_factor", 1.0) == 1.0)):
        if not ok:
            raise ValueError(f"{f.source}: unsupported {key}={f.obj.get(key)!r}")


def config_from_hf(hf: dict, *, tied_default: bool = False, source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict; an unsupported or malformed field raises ``ValueError``."""
    if not isinstance(hf, dict):
        raise ValueError(f"{source}: must hold a JSON object, got {type(hf).__name__}")
    f = Fields(hf, source)
    arch = architecture(f)
    _unsupported(f)
    hidden, heads = f.int("hidden_size"), f.int("num_attention_heads")
    kv_heads = f.int("num_key_value_heads", heads)
    if heads % kv_heads:
        f.fail("num_key_value_heads", f"a divisor of num_attention_heads ({heads})", kv_heads)
    if f.obj.get("head_dim") is None and hidden % heads:
        f.fail("hidden_size", f"a multiple of num_attention_heads ({heads}) when head_dim is absent", hidden)
    head_dim = f.int("head_dim", hidden // heads)
    if head_dim % 2:
        f.fail("head_dim", "even (rotary embeddings rotate pairs)", head_dim)
    theta, llama3 = rope(f)
    return ModelConfig(
        vocab_size=f.int("vocab_size"), hidden_size=hidden, num_layers=f.int("num_hidden_layers"),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=f.int("intermediate_size"),
        rope_theta=theta, rope_llama3_scaling=llama3, rms_norm_eps=f.float("rms_norm_eps", 1e-6),
        tie_word_embeddings=f.bool("tie_word_embeddings", tied_default),
        qkv_bias=arch == "Qwen2ForCausalLM" or f.bool("attention_bias", False),
        max_position_embeddings=f.int("max_position_embeddings", 4096),
    )


def torch_dtype(hf: dict, source: str = "config.json") -> str | None:
    """The checkpoint's dtype name (transformers 5 ``dtype``, else ``torch_dtype``), or None if absent."""
    f = Fields(hf, source)
    key = "dtype" if hf.get("dtype") is not None else "torch_dtype"
    return f.str(key, None)
