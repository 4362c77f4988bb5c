"""The K/V shapes the memory experiments size their pools with, and their byte formatting (decimal GB, as the
vLLM paper's tables). Shared by ``memory_share`` and ``memory_beam`` (which memory_share also runs)."""
from __future__ import annotations

from dataclasses import dataclass

from pagedkv import KVCache

GB = 1e9


@dataclass(frozen=True, slots=True)
class KVShape:
    """The K/V shape of a model: what one block holds, per layer, for every KV head."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_qo_heads: int

    def bytes_per_block(self, block_size: int, dtype: str) -> int:
        return KVCache.block_bytes(self.num_layers, block_size, self.num_kv_heads, self.head_dim, dtype)

    def label(self, dtype: str) -> str:
        return (f"{self.name} ({self.num_layers} layers x {self.num_kv_heads} KV heads x head_dim {self.head_dim}, "
                f"{dtype})")


LLAMA_1B = KVShape("llama-1b", num_layers=16, num_kv_heads=8, head_dim=64, num_qo_heads=32)
# NOTE: small enough that the CPU path (a float64 NumPy reference per request and layer) stays in seconds.
SMALL = KVShape("small", num_layers=2, num_kv_heads=1, head_dim=64, num_qo_heads=2)


def fmt_bytes(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= GB / 10 else f"{n / 1e6:.1f} MB"
