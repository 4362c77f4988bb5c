"""Sequence: what the manager knows of one sequence — its block table and its token count."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Sequence:
    """One sequence's logical-to-physical map.

    Token ``t`` lives in block ``block_table[t // block_size]`` at offset ``t % block_size``::

        num_tokens = 6, block_size = 4
        logical blocks   [ t0 t1 t2 t3 ][ t4 t5 .  . ]
        block_table      [     7       ,      2      ]   (physical ids, any order)

    ``num_cached_tokens`` (a multiple of ``block_size``) tokens at the start came from the prefix cache:
    their blocks are full, shared through the cache, and never written.
    """

    seq_id: int
    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0
    num_cached_tokens: int = 0

    def num_slots_in_last_block(self, block_size: int) -> int:
        """Tokens held by the last block (0 when there is none)."""
        if not self.block_table:
            return 0
        return self.num_tokens - (len(self.block_table) - 1) * block_size

    def slot(self, position: int, block_size: int) -> int:
        return self.block_table[position // block_size] * block_size + position % block_size
