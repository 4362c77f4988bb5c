"""Model configuration: a Llama-architecture decoder (Llama and Qwen2 families) and named presets."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_float(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_llama3(scaling) -> None:
    """``(factor >= 1, low > 0, high > low, original_max_position >= 1)`` or None."""
    if scaling is None:
        return
    ok = isinstance(scaling, tuple) and len(scaling) == 4 and all(_is_positive_float(x) for x in scaling[:3]) \
        and scaling[0] >= 1 and scaling[2] > scaling[1] and _is_int(scaling[3]) and scaling[3] >= 1
    if not ok:
        raise ValueError("rope_llama3_scaling must be None or (factor >= 1, low_freq_factor > 0, high_freq_factor "
                         f"> low_freq_factor, original_max_position_embeddings >= 1), got {scaling!r}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shapes and hyper-parameters of a Llama-architecture decoder.

    ``num_heads`` query heads share ``num_kv_heads`` K/V heads (GQA); ``qkv_bias`` adds q/k/v biases
    (the Qwen2 family); ``tie_word_embeddings`` reuses the embedding as the LM head.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 4096
    # Llama 3.x frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_position), or None
    rope_llama3_scaling: tuple[float, float, float, int] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("rope_theta", "rms_norm_eps"):
            if not _is_positive_float(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("tie_word_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_llama3(self.rope_llama3_scaling)

    @property
    def qkv_size(self) -> int:
        """Width of the fused q|k|v projection: ``(num_heads + 2 * num_kv_heads) * head_dim``."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def num_params(self) -> int:
        """Parameter count (a tied LM head counted once)."""
        h, i = self.hidden_size, self.intermediate_size
        per_layer = h * self.qkv_size + self.num_heads * self.head_dim * h + 3 * h * i + 2 * h
        per_layer += self.qkv_size if self.qkv_bias else 0
        head = 0 if self.tie_word_embeddings else h * self.vocab_size
        return self.vocab_size * h + self.num_layers * per_layer + h + head


PRESETS: dict[str, ModelConfig] = {
    # tiny: for CPU tests (float32, a few ms per step)
    "tiny": ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        intermediate_size=128, rope_theta=10000.0, max_position_embeddings=1024),
    # small: a text model that answers at once on a CPU (with LLM("small"), a tokenizer trained on text shipped
    # in pagedkv/text/data); random weights
    "small": ModelConfig(vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                         intermediate_size=768, rope_theta=10000.0, max_position_embeddings=2048),
    "tiny-gpu": ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=128, max_position_embeddings=1024),  # tiny, head_dim 32 (GPU)
    # llama-1b: the Llama-3.2-1B shapes (issue 4), tied embeddings
    "llama-1b": ModelConfig(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                            head_dim=64, intermediate_size=8192, rope_theta=500000.0,
                            tie_word_embeddings=True, max_position_embeddings=131072),
    # llama-8b: the Llama-3.1-8B shapes (issue 22: tensor parallelism's measurement), untied LM head
    "llama-8b": ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                            head_dim=128, intermediate_size=14336, rope_theta=500000.0,
                            max_position_embeddings=131072),
}


def get_config(name_or_config: str | ModelConfig, **overrides) -> ModelConfig:
    """A preset by name (``"tiny"``, ``"llama-1b"``) or a config, with field overrides."""
    if isinstance(name_or_config, ModelConfig):
        config = name_or_config
    elif name_or_config in PRESETS:
        config = PRESETS[name_or_config]
    else:
        raise ValueError(f"unknown model preset {name_or_config!r}; presets: {sorted(PRESETS)}")
    return replace(config, **overrides) if overrides else config
