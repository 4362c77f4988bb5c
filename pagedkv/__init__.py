"""pagedkv: PagedAttention from scratch — a paged KV cache, copy-on-write, CUDA kernels, a small engine."""
from .backend import Backend, get_backend, gpu_status
from .cache import (BlockHasher, BlockManager, InvariantError, KVCache, OutOfBlocksError, PagedAttentionManager,
                    PoolSnapshot, Usage)
from .engine import BeamSearchParams, CompletionOutput, EngineConfig, LLMEngine, RequestOutput, SamplingParams
from .llm import LLM
from .llm_inputs import TextPrompt, TokensPrompt
from .logprob import Logprob

__all__ = [
    "LLM", "Backend", "BeamSearchParams", "BlockHasher", "BlockManager", "CompletionOutput", "EngineConfig", "InvariantError", "KVCache", "LLMEngine", "Logprob",
    "OutOfBlocksError", "PagedAttentionManager", "PoolSnapshot", "RequestOutput", "SamplingParams", "TextPrompt", "TokensPrompt", "Usage",
    "get_backend", "gpu_status",
]
__version__ = "0.2.0"
