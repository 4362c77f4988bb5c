"""KVCache: the K and V pools of every layer, on NumPy or CuPy, with byte accounting."""
from __future__ import annotations

import numpy as np

from ..backend import dtype_of, get_backend
from ..kernels import ops


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class KVCache:
    """Per layer, a K pool and a V pool of fixed-size blocks, in one layout for every kernel::

        k_pool, v_pool : [num_layers, num_blocks, num_kv_heads, block_size, head_dim]   (C order)

        k_pool[layer]  = k_cache of that layer : [num_blocks, num_kv_heads, block_size, head_dim]
        ┌────────── block b ──────────┐
        │ kv head 0: block_size × head_dim  ──►  one contiguous tile (16-byte coalesced loads)
        │ kv head 1: block_size × head_dim
        │ ...
        └─────────────────────────────┘
        slot s = b * block_size + offset  ->  k_pool[layer, b, :, offset, :]

    Blocks are owned by a :class:`~pagedkv.cache.block_manager.BlockManager`; this class only holds bytes.
    ``bytes_per_block`` counts K and V of every layer.

    Args:
        num_layers, num_blocks, block_size, num_kv_heads, head_dim: positive ints.
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        device: ``"auto"`` (CuPy when a GPU is usable), ``"gpu"`` or ``"cpu"``.
    """

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype="float16",
                 device="auto"):
        self.num_layers = _positive("num_layers", num_layers)
        self.num_blocks = _positive("num_blocks", num_blocks)
        self.block_size = _positive("block_size", block_size)
        self.num_kv_heads = _positive("num_kv_heads", num_kv_heads)
        self.head_dim = _positive("head_dim", head_dim)
        self.dtype = dtype_of(dtype)
        self.backend = get_backend(device)
        self.xp = self.backend.xp
        shape = (self.num_layers, self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim)
        self.k_pool = self.xp.empty(shape, dtype=self.dtype)
        self.v_pool = self.xp.empty(shape, dtype=self.dtype)

    @classmethod
    def from_memory_budget(cls, budget_bytes, *, num_layers, block_size, num_kv_heads, head_dim,
                           dtype="float16", device="auto") -> "KVCache":
        """As many blocks as fit in ``budget_bytes`` (K and V of every layer); at least one must fit."""
        per_block = cls.block_bytes(num_layers, block_size, num_kv_heads, head_dim, dtype)
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)):
            raise ValueError(f"budget_bytes must be an int, got {budget_bytes!r}")
        if budget_bytes < per_block:
            raise ValueError(f"budget_bytes={budget_bytes} is below one block ({per_block} bytes)")
        return cls(num_layers, int(budget_bytes) // per_block, block_size, num_kv_heads, head_dim, dtype, device)

    @staticmethod
    def block_bytes(num_layers, block_size, num_kv_heads, head_dim, dtype) -> int:
        sizes = [_positive(n, v) for n, v in (("num_layers", num_layers), ("block_size", block_size),
                                              ("num_kv_heads", num_kv_heads), ("head_dim", head_dim))]
        return 2 * int(np.prod(sizes)) * dtype_of(dtype).itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.block_bytes(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_block * self.num_blocks

    def k_cache(self, layer: int):
        """[num_blocks, num_kv_heads, block_size, head_dim] view of layer ``layer``'s K pool."""
        return self.k_pool[self._layer(layer)]

    def v_cache(self, layer: int):
        return self.v_pool[self._layer(layer)]

    def write(self, layer: int, slot_mapping, k, v) -> None:
        """Write ``k, v: [num_tokens, num_kv_heads, head_dim]`` into ``slot_mapping`` (-1 skips a token)."""
        layer = self._layer(layer)
        slots = self.xp.asarray(slot_mapping)
        ops.write_kv(self.xp.asarray(k), self.xp.asarray(v), self.k_pool[layer], self.v_pool[layer], slots)

    def gather(self, layer: int, block_table, context_len: int):
        """K and V of one sequence, contiguous: ``[context_len, num_kv_heads, head_dim]`` each, on the backend."""
        layer = self._layer(layer)
        table = np.asarray(block_table, dtype=np.int64)
        num_used = -(-int(context_len) // self.block_size)
        if context_len < 0 or num_used > table.shape[0]:
            raise ValueError(f"context_len={context_len} beyond its block table of {table.shape[0]} blocks")
        if ((table[:num_used] < 0) | (table[:num_used] >= self.num_blocks)).any():
            raise ValueError(f"block table {table[:num_used].tolist()} has ids outside [0, {self.num_blocks})")
        ids = self.xp.asarray(table[:num_used])
        return tuple(self._gather_pool(pool[layer], ids, int(context_len)) for pool in (self.k_pool, self.v_pool))

    def _gather_pool(self, cache, ids, context_len: int):
        blocks = cache[ids]  # [num_used, num_kv_heads, block_size, head_dim]
        tokens = blocks.transpose(0, 2, 1, 3).reshape(-1, self.num_kv_heads, self.head_dim)
        return tokens[:context_len]

    def copy_blocks(self, src_block_ids, dst_block_ids) -> None:
        """Copy blocks ``src[i] -> dst[i]`` in every layer's K and V pool (one launch on GPU).

        NOTE: the ids come from the host, so they are range-checked here, on the host; the GPU-side check of
        ``ops.copy_blocks`` (a reduction and a device-to-host read) would make the host wait for the GPU in the
        middle of an engine step.
        """
        src, dst = np.asarray(src_block_ids, dtype=np.int64), np.asarray(dst_block_ids, dtype=np.int64)
        if src.ndim != 1 or src.shape != dst.shape:
            raise ValueError(f"src_block_ids {src.shape} and dst_block_ids {dst.shape} must be equal 1-D lengths")
        ops.check_copy_ranges_host(src, dst, self.num_blocks)
        ops.copy_blocks(self.k_pool, self.v_pool, self.xp.asarray(src), self.xp.asarray(dst), check=False)

    def _layer(self, layer) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer!r} outside [0, {self.num_layers})")
        return int(layer)


def check_kv(cache, k, v, token_shape: tuple) -> None:
    """k/v must both be given or both omitted, with shape [num_layers, *token_shape, num_kv_heads, head_dim] and
    the dtype of ``cache`` (a :class:`KVCache`, or any pool with those four attributes): ``ValueError`` naming
    the offending one."""
    if (k is None) != (v is None):
        raise ValueError("give both k and v, or neither")
    if k is None:
        return
    want = (cache.num_layers, *token_shape, cache.num_kv_heads, cache.head_dim)
    for name, x in (("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name} must be an array of shape {want}, got {type(x).__name__}")
        if tuple(x.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
        if x.dtype != cache.dtype:
            raise ValueError(f"{name} dtype {x.dtype} differs from the cache dtype {cache.dtype}")
