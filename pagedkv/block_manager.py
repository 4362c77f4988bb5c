"""BlockManager: the physical-block allocator of the paged KV cache (pure Python, no arrays)."""
from __future__ import annotations

import operator
import threading
from collections import deque
from collections.abc import Iterable


class OutOfBlocksError(ValueError):
    """The pool has fewer free blocks than a request needs; nothing was allocated."""


class BlockManager:
    """A fixed pool of ``num_blocks`` blocks of ``block_size`` token slots, with reference counts.

    Invariants (checked by :meth:`check_invariants`, kept under one ``threading.Lock``):

    1. ``num_free_blocks + num_used_blocks == num_blocks``;
    2. every used block has ``ref_count >= 1``; a free block has ``ref_count == 0``;
    3. no block id appears twice in the free list.

    Reuse order: the free list is a FIFO queue. It starts as ``0, 1, ..., num_blocks - 1``;
    :meth:`allocate` takes from the front and a block whose count drops to zero joins the back,
    so the least recently freed block is reused first::

        free: [3 4 5]   allocate(2) -> [3, 4]   free: [5]
        free([4])       free: [5 4]             allocate(1) -> [5]

    Every method is all-or-nothing: a call that raises has changed nothing.
    """

    def __init__(self, num_blocks: int, block_size: int):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._lock = threading.Lock()
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    # -- queries -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        return 0 <= num_blocks <= len(self._free)

    def ref_count(self, block_id: int) -> int:
        (block_id,) = _as_ids([block_id])
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def snapshot(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The whole state as values: ``(free list in order, ref count of every block)``."""
        with self._lock:
            return tuple(self._free), tuple(self._ref_counts)

    # -- actions ---------------------------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks from the front of the free list, each with ``ref_count = 1``.

        Raises:
            ValueError: ``num_blocks`` is negative or not an int.
            OutOfBlocksError: fewer than ``num_blocks`` are free (nothing is taken).
        """
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 0:
            raise ValueError(f"num_blocks must be a non-negative int, got {num_blocks!r}")
        with self._lock:
            if num_blocks > len(self._free):
                raise OutOfBlocksError(
                    f"requested {num_blocks} blocks but only {len(self._free)} of {self.num_blocks} are free"
                )
            block_ids = [self._free.popleft() for _ in range(num_blocks)]
            for b in block_ids:
                self._ref_counts[b] = 1
            return block_ids

    def share(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each used block (a fork). An id may appear more than once."""
        block_ids = _as_ids(block_ids)
        with self._lock:
            self._validate_used(block_ids, "share")
            for b in block_ids:
                self._ref_counts[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; a block whose count reaches zero joins the free list.

        The whole list is validated first: an unknown id, a free id, or more drops than references
        raises ``ValueError`` and no count changes.
        """
        block_ids = _as_ids(block_ids)
        with self._lock:
            self._validate_used(block_ids, "free")
            for b in block_ids:
                self._ref_counts[b] -= 1
                if self._ref_counts[b] == 0:
                    self._free.append(b)

    def check_invariants(self) -> None:
        """Assert the three invariants of the class docstring (for tests and debugging)."""
        with self._lock:
            free = list(self._free)
            assert len(set(free)) == len(free), "a block id appears twice in the free list"
            free_set = set(free)
            used = [b for b in range(self.num_blocks) if b not in free_set]
            assert len(free) + len(used) == self.num_blocks
            assert all(self._ref_counts[b] >= 1 for b in used), "a used block has ref_count < 1"
            assert all(self._ref_counts[b] == 0 for b in free), "a free block has ref_count != 0"

    # -- helpers ---------------------------------------------------------------------------------
    def _check_id(self, block_id) -> None:
        if isinstance(block_id, bool) or not isinstance(block_id, int) or not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id!r} outside [0, {self.num_blocks})")

    def _validate_used(self, block_ids: list[int], action: str) -> None:
        drops: dict[int, int] = {}
        for b in block_ids:
            self._check_id(b)
            drops[b] = drops.get(b, 0) + 1
        for b, n in drops.items():
            if self._ref_counts[b] == 0:
                raise ValueError(f"cannot {action} block {b}: it is free")
            if action == "free" and n > self._ref_counts[b]:
                raise ValueError(f"cannot free block {b} {n} times: its ref_count is {self._ref_counts[b]}")


def _as_ids(block_ids: Iterable[int]) -> list:
    """Python ints from any integer-like ids (NumPy ints too); other values are kept and refused later."""
    if isinstance(block_ids, (str, bytes)) or not hasattr(block_ids, "__iter__"):
        raise ValueError(f"block ids must be an iterable of ints, got {block_ids!r}")
    out = []
    for b in block_ids:
        try:
            out.append(b if isinstance(b, bool) else operator.index(b))
        except TypeError:
            out.append(b)
    return out
