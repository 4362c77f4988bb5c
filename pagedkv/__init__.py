"""pagedkv: PagedAttention from scratch — a paged KV cache, copy-on-write, CUDA kernels, a small engine."""
from .backend import Backend, get_backend, gpu_status
from .block_hash import BlockHasher
from .block_manager import BlockManager, InvariantError, OutOfBlocksError, PoolSnapshot
from .engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from .kv_cache import KVCache
from .llm import LLM
from .manager import PagedAttentionManager
from .usage import Usage

__all__ = [
    "LLM", "Backend", "BlockHasher", "BlockManager", "EngineConfig", "InvariantError", "KVCache", "LLMEngine",
    "OutOfBlocksError", "PagedAttentionManager", "PoolSnapshot", "RequestOutput", "SamplingParams", "Usage",
    "get_backend", "gpu_status",
]
__version__ = "0.2.0"
