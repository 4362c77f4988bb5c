"""BlockManager: the physical-block allocator of the paged KV cache, with optional prefix caching (pure Python)."""
from __future__ import annotations

import operator
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import NamedTuple


class OutOfBlocksError(ValueError):
    """The pool has fewer free blocks than a request needs; nothing was allocated."""


class InvariantError(RuntimeError):
    """:meth:`BlockManager.check_invariants` found the allocator's state broken (a bug, never a caller mistake)."""


class PoolSnapshot(NamedTuple):
    """The allocator's whole state as values (equal snapshots = indistinguishable pools)."""

    free_ids: tuple[int, ...]                # truly free blocks, in reuse order
    ref_counts: tuple[int, ...]              # per block
    evictable_ids: tuple[int, ...]           # cached blocks with ref_count 0, least recently used first
    block_hashes: tuple[bytes | None, ...]   # per block: the content hash it carries, or None
    num_evictions: int


class BlockManager:
    """A fixed pool of ``num_blocks`` blocks of ``block_size`` token slots, with reference counts and,
    when ``enable_prefix_caching``, content hashes of full blocks kept after their last reference is gone.

    States of a block (``ref_count`` = how many block tables hold it)::

        +-----------+  allocate: free list first (FIFO)  +-------------+  share / acquire: ref + 1
        |   free    | ---------------------------------> |    used     |  free: ref - 1
        |   ref 0   |                                    |  ref >= 1   |  register(hash): names a full
        |  no hash  | <--------------------------------- | hash or not |  block's content
        +-----------+   free: ref -> 0, no hash          +-------------+
                                                           |    ^     ^
                                                       (1) |    | (2) | (3)
                                                           v    |     |
                                                         +-------------+
                                                         |  evictable  |
                                                         |    ref 0    |
                                                         |   hashed    |
                                                         +-------------+

        (1) free: ref -> 0 with a hash: joins the back of the LRU (keeps its hash and its K/V)
        (2) acquire, a cache hit: leaves the LRU, ref 1, hash kept
        (3) allocate with the free list empty: the LRU's front is evicted, its hash DROPPED at that moment

    Invariants (checked by :meth:`check_invariants`, which raises :class:`InvariantError`; kept under one
    ``threading.Lock``):

    1. ``free + evictable + used == num_blocks``; ``num_free_blocks`` (what :meth:`allocate` can hand out)
       is ``free + evictable``, ``num_used_blocks`` the rest;
    2. every used block has ``ref_count >= 1``; free and evictable blocks have ``ref_count == 0``;
    3. no block id appears twice across the free list and the LRU;
    4. every evictable block has a hash; a free block has none;
    5. every hash maps to exactly one block and that block's recorded hash is it (and back);
    6. without prefix caching no block has a hash, so nothing is ever evictable.

    Reuse order: the free list is a FIFO queue that starts as ``0, 1, ..., num_blocks - 1``; a block whose
    count drops to zero joins its back, or, if it carries a hash, the back of the LRU. :meth:`allocate`
    takes from the front of the free list and only then evicts from the front of the LRU, so cached
    content is dropped as late as possible and least recently released first::

        free: [3 4 5]   allocate(2) -> [3, 4]   free: [5]
        free([4])       free: [5 4]             allocate(1) -> [5]

        with caching:   free: [4 5]   lru: [2 0 3]           (2 released longest ago)
        allocate(3) -> [4, 5, 2]      free: []  lru: [0 3]   2's hash is gone: no lookup can find it
        acquire([3])                  lru: [0]               a cache hit: 3 is used again, hash kept
        free([3, 4])                  free: [4] lru: [0 3]   3 is hashed -> LRU; 4 has none -> free list

    Eviction drops the hash at the moment the block is handed out again, so a hash never names a block
    whose memory is about to hold other tokens. Every method is all-or-nothing: a call that raises has
    changed nothing. Block ids must be ints (NumPy ints too), never bools.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = False):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {enable_prefix_caching!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._lock = threading.Lock()
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # the LRU: front = least recently released
        self._ref_counts = [0] * num_blocks
        self._hashes: list[bytes | None] = [None] * num_blocks
        self._hash_to_block: dict[bytes, int] = {}
        self._num_evictions = 0

    # -- queries -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks :meth:`allocate` can hand out: truly free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks carrying a hash (used or evictable): what :meth:`lookup` can find."""
        return len(self._hash_to_block)

    @property
    def num_evictions(self) -> int:
        """Cached blocks handed out again (their hash dropped) since the pool was made."""
        return self._num_evictions

    def can_allocate(self, num_blocks: int) -> bool:
        return 0 <= num_blocks <= self.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[self._one_id(block_id)]

    def block_hash(self, block_id: int) -> bytes | None:
        """The content hash a block carries (``None``: free, or never registered, or evicted)."""
        return self._hashes[self._one_id(block_id)]

    def count_evictable(self, block_ids: Iterable[int]) -> int:
        """How many distinct ``block_ids`` are evictable now: acquiring them lowers ``num_free_blocks`` by it."""
        block_ids = as_ids(block_ids)
        with self._lock:
            for b in block_ids:
                self._check_id(b)
            return sum(1 for b in set(block_ids) if b in self._evictable)

    def lookup(self, block_hashes: Iterable[bytes]) -> list[int]:
        """The blocks holding the longest cached prefix of a hash chain (no state changes).

        Args:
            block_hashes: a sequence's full-block hashes in order (``pagedkv.cache.block_hash.BlockHasher``).
        Returns:
            block ids of ``block_hashes[:k]`` for the largest ``k`` whose hashes are all cached
            (``[]`` without prefix caching). Valid until the next call that may evict (``allocate``).
        """
        block_hashes = as_hashes(block_hashes)
        with self._lock:
            out = []
            for h in block_hashes:
                b = self._hash_to_block.get(h)
                if b is None:
                    break
                out.append(b)
            return out

    def snapshot(self) -> PoolSnapshot:
        """The whole state as values: free list, ref counts, LRU, hashes, evictions."""
        with self._lock:
            return PoolSnapshot(tuple(self._free), tuple(self._ref_counts), tuple(self._evictable),
                                tuple(self._hashes), self._num_evictions)

    # -- actions ---------------------------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks, each with ``ref_count = 1``: the free list's front first, then the
        least recently used evictable blocks, whose hashes are dropped as they are taken.

        Raises:
            ValueError: ``num_blocks`` is negative or not an int.
            OutOfBlocksError: fewer than ``num_blocks`` are free (nothing is taken).
        """
        num_blocks = _check_count(num_blocks)
        with self._lock:
            self._check_room(num_blocks)
            return self._take(num_blocks)

    def acquire(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each cached block (a cache hit); an evictable one leaves the LRU.

        Raises:
            ValueError: an id is not a block carrying a hash (nothing changes).
        """
        block_ids = as_ids(block_ids)
        with self._lock:
            self._validate_cached(block_ids)
            self._acquire(block_ids)

    def acquire_and_allocate(self, cached_block_ids: Iterable[int], num_blocks: int) -> list[int]:
        """:meth:`acquire` ``cached_block_ids`` and :meth:`allocate` ``num_blocks`` more, as one step.

        Returns:
            ``cached_block_ids + fresh ids``: a block table whose first blocks are the cached prefix.
        Raises:
            OutOfBlocksError: the fresh blocks do not fit once the evictable cached ones are taken.
        """
        cached_block_ids, num_blocks = as_ids(cached_block_ids), _check_count(num_blocks)
        with self._lock:
            self._validate_cached(cached_block_ids)
            self._check_room(num_blocks + sum(1 for b in set(cached_block_ids) if b in self._evictable))
            self._acquire(cached_block_ids)
            return list(cached_block_ids) + self._take(num_blocks)

    def register(self, block_id: int, block_hash: bytes) -> bool:
        """Record that a full, used block now holds the content named ``block_hash``.

        Returns:
            True when the block carries that hash afterwards; False (and nothing changes) when the hash
            already names another block (the same content computed twice: this copy stays unnamed).
        Raises:
            ValueError: caching is off, the block is not used, or it already carries a different hash.
        """
        (block_hash,) = as_hashes([block_hash])
        block_id = self._one_id(block_id)
        if not self.enable_prefix_caching:
            raise ValueError("cannot register a block hash: prefix caching is disabled")
        with self._lock:
            if self._ref_counts[block_id] == 0:
                raise ValueError(f"cannot register block {block_id}: it is not in use")
            current = self._hashes[block_id]
            if current is not None and current != block_hash:
                raise ValueError(f"block {block_id} already holds content {current.hex()[:16]}..., "
                                 f"not {block_hash.hex()[:16]}... (full blocks never change)")
            if self._hash_to_block.setdefault(block_hash, block_id) != block_id:
                return False
            self._hashes[block_id] = block_hash
            return True

    def share(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each used block (a fork). An id may appear more than once."""
        block_ids = as_ids(block_ids)
        with self._lock:
            self._validate_used(block_ids, "share")
            for b in block_ids:
                self._ref_counts[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; at zero a block joins the back of the free list, or of the
        LRU if it carries a hash (in list order).

        The whole list is validated first: an unknown id, a free id, or more drops than references
        raises ``ValueError`` and no count changes.
        """
        block_ids = as_ids(block_ids)
        with self._lock:
            self._validate_used(block_ids, "free")
            for b in block_ids:
                self._ref_counts[b] -= 1
                if self._ref_counts[b] == 0:
                    if self._hashes[b] is None:
                        self._free.append(b)
                    else:
                        self._evictable[b] = None

    def check_invariants(self) -> None:
        """Raise :class:`InvariantError` naming every broken invariant of the class docstring (also under -O)."""
        with self._lock:
            problems = self._violations()
        if problems:
            raise InvariantError("; ".join(problems))

    # -- helpers (called with the lock held where they touch state) --------------------------------
    def _take(self, num_blocks: int) -> list[int]:
        block_ids = []
        for _ in range(num_blocks):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._hash_to_block[self._hashes[b]]
                self._hashes[b] = None
                self._num_evictions += 1
            self._ref_counts[b] = 1
            block_ids.append(b)
        return block_ids

    def _acquire(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if self._ref_counts[b] == 0:
                del self._evictable[b]
            self._ref_counts[b] += 1

    def _check_room(self, num_blocks: int) -> None:
        if num_blocks > self.num_free_blocks:
            raise OutOfBlocksError(
                f"requested {num_blocks} blocks but only {self.num_free_blocks} of {self.num_blocks} are free")

    def _one_id(self, block_id) -> int:
        (block_id,) = as_ids([block_id])
        self._check_id(block_id)
        return block_id

    def _check_id(self, block_id) -> None:
        if isinstance(block_id, bool) or not isinstance(block_id, int) or not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id!r} outside [0, {self.num_blocks})")

    def _validate_cached(self, block_ids: list[int]) -> None:
        for b in block_ids:
            self._check_id(b)
            if self._hashes[b] is None:
                state = "free" if self._ref_counts[b] == 0 else "used but holds no cached content"
                raise ValueError(f"cannot acquire block {b}: it is {state}")

    def _validate_used(self, block_ids: list[int], action: str) -> None:
        drops: dict[int, int] = {}
        for b in block_ids:
            self._check_id(b)
            drops[b] = drops.get(b, 0) + 1
        for b, n in drops.items():
            if self._ref_counts[b] == 0:
                state = "evictable (cached, unused: acquire it)" if b in self._evictable else "free"
                raise ValueError(f"cannot {action} block {b}: it is {state}")
            if action == "free" and n > self._ref_counts[b]:
                raise ValueError(f"cannot free block {b} {n} times: its ref_count is {self._ref_counts[b]}")

    def _violations(self) -> list[str]:
        free, lru, refs, hashes = list(self._free), list(self._evictable), self._ref_counts, self._hashes
        unused = free + lru
        unused_set = set(unused)
        problems = []
        if len(unused_set) != len(unused):
            problems.append("a block id appears twice across the free list and the LRU")
        if any(not 0 <= b < self.num_blocks for b in unused):
            problems.append("the free list or the LRU holds an id outside the pool")
        used = [b for b in range(self.num_blocks) if b not in unused_set]
        if len(unused_set) + sum(r >= 1 for r in refs) != self.num_blocks:
            problems.append("free + evictable + used (ref_count >= 1) != num_blocks: a block is lost")
        if any(refs[b] < 1 for b in used):
            problems.append("a used block has ref_count < 1")
        if any(refs[b] != 0 for b in unused if 0 <= b < self.num_blocks):
            problems.append("a free or evictable block has ref_count != 0")
        if any(hashes[b] is None for b in lru if 0 <= b < self.num_blocks):
            problems.append("an evictable block has no hash")
        if any(hashes[b] is not None for b in free if 0 <= b < self.num_blocks):
            problems.append("a free block has a hash")
        named = {h: b for b, h in enumerate(hashes) if h is not None}
        if len(named) != sum(h is not None for h in hashes) or named != self._hash_to_block:
            problems.append("the hash map and the blocks' recorded hashes disagree")
        if not self.enable_prefix_caching and (named or lru):
            problems.append("a block has a hash although prefix caching is disabled")
        return problems


def _check_count(num_blocks) -> int:
    if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 0:
        raise ValueError(f"num_blocks must be a non-negative int, got {num_blocks!r}")
    return num_blocks


def as_ids(block_ids: Iterable[int]) -> list:
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


def as_hashes(block_hashes: Iterable[bytes]) -> list[bytes]:
    """A list of non-empty ``bytes`` hashes (a single bytes object is refused: it would iterate as ints)."""
    if isinstance(block_hashes, (str, bytes, bytearray)) or not hasattr(block_hashes, "__iter__"):
        raise ValueError(f"block hashes must be an iterable of bytes, got {block_hashes!r:.80}")
    out = list(block_hashes)
    for h in out:
        if type(h) is not bytes or not h:
            raise ValueError(f"a block hash must be non-empty bytes, got {h!r:.80}")
    return out
