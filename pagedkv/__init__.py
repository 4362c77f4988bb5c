"""pagedkv: PagedAttention from scratch — a paged KV cache, copy-on-write, CUDA kernels, a small engine."""
from .backend import Backend, get_backend, gpu_status
from .block_manager import BlockManager, OutOfBlocksError
from .kv_cache import KVCache
from .manager import PagedAttentionManager
from .usage import Usage

__all__ = [
    "Backend", "BlockManager", "KVCache", "OutOfBlocksError", "PagedAttentionManager", "Usage",
    "get_backend", "gpu_status",
]
__version__ = "0.1.0"
