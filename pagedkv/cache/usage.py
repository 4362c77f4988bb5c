"""Usage: a snapshot of how the KV pool is used, for the experiments and the engine's metrics."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Usage:
    """Measured from the pool itself.

    ``num_token_slots_used`` counts filled slots of physical blocks (a shared block counts once);
    ``num_token_slots_reserved`` is ``num_used_blocks * block_size``; ``num_logical_tokens`` sums every
    sequence's length (what a cache without sharing would have to hold).
    """

    num_blocks: int
    num_used_blocks: int
    num_free_blocks: int
    num_token_slots_used: int
    num_token_slots_reserved: int
    num_logical_tokens: int
    bytes_per_block: int
    num_shared_blocks: int
    num_cow_copies: int
    num_sequences: int

    @property
    def utilization(self) -> float:
        """Filled token slots / reserved token slots (1.0 for an empty pool)."""
        if self.num_token_slots_reserved == 0:
            return 1.0
        return self.num_token_slots_used / self.num_token_slots_reserved

    @property
    def bytes_used(self) -> int:
        return self.num_used_blocks * self.bytes_per_block

    @property
    def bytes_total(self) -> int:
        return self.num_blocks * self.bytes_per_block


def measure_usage(sequences, block_manager, block_size: int, bytes_per_block: int, num_cow_copies: int) -> Usage:
    """The pool's :class:`Usage` from its sequences (``Sequence``: ``block_table``, ``num_tokens``) and allocator."""
    filled: dict[int, int] = {}
    for s in sequences:
        for i, b in enumerate(s.block_table):
            filled[b] = max(filled.get(b, 0), min(block_size, s.num_tokens - i * block_size))
    bm = block_manager
    refs = bm.snapshot().ref_counts
    return Usage(
        num_blocks=bm.num_blocks, num_used_blocks=bm.num_used_blocks, num_free_blocks=bm.num_free_blocks,
        num_token_slots_used=sum(filled.values()), num_token_slots_reserved=bm.num_used_blocks * block_size,
        num_logical_tokens=sum(s.num_tokens for s in sequences), bytes_per_block=bytes_per_block,
        num_shared_blocks=sum(1 for r in refs if r > 1), num_cow_copies=num_cow_copies,
        num_sequences=len(sequences),
    )
