"""A Llama-architecture decoder (Llama, Qwen2) on the paged KV cache; its attention runs in one backend
(:mod:`pagedkv.model.attention`)."""
from .checkpoint import load_checkpoint
from .config import PRESETS, ModelConfig, get_config
from .generation_config import GenerationConfig, read_generation_config
from .llama import DecodeBatch, LlamaModel, PrefillBatch
from .weights import LayerWeights, ModelWeights, random_weights

__all__ = ["PRESETS", "DecodeBatch", "GenerationConfig", "LayerWeights", "LlamaModel", "ModelConfig", "ModelWeights",
           "PrefillBatch", "get_config", "load_checkpoint", "random_weights", "read_generation_config"]
