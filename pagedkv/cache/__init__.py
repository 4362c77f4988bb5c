"""The paged KV memory: the allocator, the hash chains of full blocks, the K/V pools and the manager.

``manager.PagedAttentionManager`` is the only door to block ids for the rest of the package (sequences,
copy-on-write, cached prefixes, copy-from-cached-block, static reservations); ``block_manager`` is its
allocator and is imported by nothing outside this package.
"""
from .block_hash import BlockHasher
from .block_manager import BlockManager, InvariantError, OutOfBlocksError, PoolSnapshot
from .kv_cache import KVCache
from .manager import PagedAttentionManager
from .usage import Usage

__all__ = ["BlockHasher", "BlockManager", "InvariantError", "KVCache", "OutOfBlocksError", "PagedAttentionManager",
           "PoolSnapshot", "Usage"]
