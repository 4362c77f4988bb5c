"""pagedkv: PagedAttention from scratch — a paged KV cache, copy-on-write, CUDA kernels, a small engine."""
from .backend import Backend, get_backend, gpu_status
from .cache import (BlockHasher, BlockManager, InvariantError, KVCache, OutOfBlocksError, PagedAttentionManager,
                    PoolSnapshot, Usage)
from .engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from .llm import LLM

__all__ = [
    "LLM", "Backend", "BlockHasher", "BlockManager", "EngineConfig", "InvariantError", "KVCache", "LLMEngine",
    "OutOfBlocksError", "PagedAttentionManager", "PoolSnapshot", "RequestOutput", "SamplingParams", "Usage",
    "get_backend", "gpu_status",
]
__version__ = "0.2.0"
