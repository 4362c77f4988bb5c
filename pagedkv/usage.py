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
