"""PagedAttentionManager: sequences on a paged KV cache, with fork, copy-on-write and cached prefixes.

Over 400 lines because it is the one door to block ids (sequences, copy-on-write, cached prefixes, copies from
a cached block, static reservations), every call under one lock; its lock-free helpers live beside it
(``kv_cache.check_kv``, ``usage.measure_usage``, ``block_manager.as_ids``).
"""
from __future__ import annotations

import operator
import threading
from itertools import count

import numpy as np

from ..kernels import ops
from .block_manager import BlockManager, OutOfBlocksError, as_hashes, as_ids
from .kv_cache import KVCache, check_kv
from .sequence import Sequence
from .usage import Usage, measure_usage


class PagedAttentionManager:
    """Registers sequences, reserves their token slots block by block, forks and frees them.

    ``fork_sequence`` copies a block *table* and adds a reference to every block; no K/V moves.
    Copy-on-write: reserving a slot in a last, partial block whose ``ref_count > 1`` first takes a
    fresh block, copies the shared one into it (every layer), drops one reference to the old block
    and then hands out the slot. Full blocks are never written again, so they are never copied::

        parent [ A: t0..t3 ][ B: t4 t5 . . ]      fork ->  child shares A (ref 2) and B (ref 2)
        child.append_token  ->  B' = copy of B;  child [ A ][ B': t4 t5 t6' . ];  B ref 1

    Prefix caching (``enable_prefix_caching=True``): a sequence may start on cached full blocks found by
    :meth:`lookup` (``add_sequence(..., cached_block_ids=...)``; their K/V is not written again), and
    :meth:`register_blocks` names a sequence's full blocks by their hashes once their K/V is written, so
    that later sequences find them. Cached blocks are full, so they are never written and never copied::

        hashes  h0 -> h1 -> h2                 (pagedkv.cache.block_hash: each chained on its parent; bs 16)
        lookup([h0, h1, h2], 50) -> [5, 9]     h2 is not cached: the prefix is blocks 5 and 9 (32 tokens)
        add_sequence(50, cached_block_ids=[5, 9])   table [5 9 | 12 3]; only t32..t49 are computed
        register_blocks(seq, [h0, h1, h2])     names block 12 h2 once its K/V is written (5, 9 already are)

    Every method is thread-safe (one re-entrant lock, :attr:`lock`) and all-or-nothing: a call that
    raises ``ValueError`` (``OutOfBlocksError`` included) leaves the manager, the allocator and the
    cache exactly as they were. Sequence ids must be ints (NumPy ints too), never bools or floats.
    """

    def __init__(self, kv_cache: KVCache, *, enable_prefix_caching: bool = False):
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.block_manager = BlockManager(kv_cache.num_blocks, kv_cache.block_size,
                                          enable_prefix_caching=enable_prefix_caching)
        self._seqs: dict[int, Sequence] = {}
        self._reserved: dict[object, list[int]] = {}  # static batching: owner -> blocks held for later
        self._next_id = count()
        self._lock = threading.RLock()
        self.num_cow_copies = 0

    @classmethod
    def create(cls, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype="float16",
               device="auto", *, enable_prefix_caching: bool = False) -> "PagedAttentionManager":
        return cls(KVCache(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device),
                   enable_prefix_caching=enable_prefix_caching)

    @property
    def lock(self) -> threading.RLock:
        """Hold it across :meth:`lookup` and :meth:`add_sequence` when other threads may allocate meanwhile."""
        return self._lock

    # -- sequences ----------------------------------------------------------------------------------
    @property
    def seq_ids(self) -> list[int]:
        with self._lock:
            return list(self._seqs)

    def lookup(self, block_hashes, num_tokens: int) -> list[int]:
        """Cached blocks a new sequence of ``num_tokens`` tokens can start on (no state changes).

        Args:
            block_hashes: the hashes of the sequence's full blocks, in order (extra ones are ignored).
        Returns:
            block ids of the longest cached prefix, at most ``(num_tokens - 1) // block_size`` blocks, so
            that at least one token is always computed (a fully cached prompt recomputes its last block).
        """
        num_tokens = _count("num_tokens", num_tokens)
        block_hashes = as_hashes(block_hashes)
        return self.block_manager.lookup(block_hashes[: (num_tokens - 1) // self.block_size])

    def num_blocks_to_add(self, num_tokens: int, *, cached_block_ids=(), copy_from: int | None = None) -> int:
        """How far ``num_free_blocks`` drops if this sequence is added now (fresh + evictable cached blocks, + an
        evictable ``copy_from`` block, held while it is read)."""
        num_tokens = _count("num_tokens", num_tokens)
        cached = self._cached_ids(cached_block_ids, num_tokens)
        with self._lock:
            held = copy_from is not None and self.block_manager.ref_count(copy_from) == 0
            return self._blocks_for(num_tokens) - len(cached) + self.block_manager.count_evictable(cached) + int(held)

    def can_add(self, num_tokens: int, *, cached_block_ids=(), copy_from: int | None = None) -> bool:
        need = self.num_blocks_to_add(num_tokens, cached_block_ids=cached_block_ids, copy_from=copy_from)
        return self.block_manager.can_allocate(need)

    def add_sequence(self, num_tokens: int, *, k=None, v=None, cached_block_ids=(),
                     copy_from: int | None = None) -> int:
        """Register a sequence of ``num_tokens`` tokens and reserve ``ceil(num_tokens / block_size)`` blocks,
        the first ones being ``cached_block_ids`` (acquired: ref + 1, their K/V already in the cache)::

            cached_block_ids = [5, 9], block_size 4, num_tokens 10
            block_table [ 5: t0..t3 | 9: t4..t7 | fresh: t8 t9 . . ]    k, v hold t8 t9 only

        ``copy_from``: a cached block whose first tokens match the block after the cached prefix; its K/V is
        copied into that (fresh) block, the source held meanwhile so that the allocation cannot evict it.

        Args:
            num_tokens: >= 1.
            k, v: optional ``[num_layers, num_tokens - num_cached_tokens, num_kv_heads, head_dim]`` K/V of
                the tokens after the cached prefix (``num_cached_tokens = len(cached_block_ids) * block_size``).
            cached_block_ids: blocks from :meth:`lookup`, in order, with no allocation since (single thread,
                or hold :attr:`lock` across both calls).
            copy_from: optional id of a cached block (see :meth:`cached_block`); needs a block after the prefix.
        Returns:
            the new sequence id.
        Raises:
            ValueError: a cached id is not a cached block, appears twice, or covers more than num_tokens; a
                ``copy_from`` that is not a cached block, or with no block after the prefix to copy into.
            OutOfBlocksError: the fresh blocks do not fit (nothing acquired, nothing allocated).
        """
        num_tokens = _count("num_tokens", num_tokens)
        cached = self._cached_ids(cached_block_ids, num_tokens)
        num_cached_tokens = len(cached) * self.block_size
        check_kv(self.kv_cache, k, v, (num_tokens - num_cached_tokens,))
        with self._lock:
            fresh = self._blocks_for(num_tokens) - len(cached)
            if copy_from is None:
                block_table = self.block_manager.acquire_and_allocate(cached, fresh)  # raises before any change
            else:
                block_table = self._allocate_copying(cached, fresh, copy_from)
            seq = Sequence(next(self._next_id), block_table, num_tokens, num_cached_tokens)
            self._seqs[seq.seq_id] = seq
            if k is not None and k.shape[1]:
                self._write(seq, num_cached_tokens, k, v)
            return seq.seq_id

    def _allocate_copying(self, cached: list[int], fresh: int, src) -> list[int]:
        """``cached + fresh`` blocks, the first fresh one a copy of cached block ``src`` (held while read)."""
        bm = self.block_manager
        if isinstance(src, bool) or not isinstance(src, (int, np.integer)) or bm.block_hash(int(src)) is None:
            raise ValueError(f"copy_from={src!r} is not a cached block")
        if fresh < 1 or src in cached:
            raise ValueError(f"copy_from={src!r} needs a fresh block after the {len(cached)} cached ones")
        bm.acquire([int(src)])
        try:
            block_table = bm.acquire_and_allocate(cached, fresh)  # raises before any change
            self.kv_cache.copy_blocks([int(src)], [block_table[len(cached)]])
            return block_table
        finally:
            bm.free([int(src)])

    def register_blocks(self, seq_id: int, block_hashes) -> int:
        """Name a sequence's first ``len(block_hashes)`` blocks by their content hashes (their K/V is written).

        A block already named so (it came from the cache) is left alone; a hash that already names another
        block (the same tokens computed twice) leaves this copy unnamed.

        Returns:
            how many blocks were newly named.
        Raises:
            ValueError: caching is off, more hashes than full blocks, or a block named differently before.
        """
        block_hashes = as_hashes(block_hashes)
        with self._lock:
            seq, bm = self._get(seq_id), self.block_manager
            if not bm.enable_prefix_caching:
                raise ValueError("cannot register block hashes: prefix caching is disabled")
            if len(block_hashes) > seq.num_tokens // self.block_size:
                raise ValueError(f"{len(block_hashes)} hashes but sequence {seq.seq_id} has only "
                                 f"{seq.num_tokens // self.block_size} full blocks")
            pairs = list(zip(seq.block_table, block_hashes))
            for b, h in pairs:  # validate all first: all-or-nothing
                if bm.block_hash(b) not in (None, h):
                    raise ValueError(f"block {b} of sequence {seq.seq_id} already holds other content")
            return sum(bm.block_hash(b) is None and bm.register(b, h) for b, h in pairs)

    def register_block(self, seq_id: int, index: int, block_hash: bytes) -> bool:
        """Name block ``index`` of a sequence (full, its K/V written) by its hash: True when it carries the hash
        afterwards, False when the hash already names another block (this copy stays unnamed)."""
        with self._lock:
            seq = self._get(seq_id)
            if not 0 <= index < seq.num_tokens // self.block_size:
                raise ValueError(f"block {index} of sequence {seq.seq_id} is not a full block")
            return self.block_manager.register(seq.block_table[index], block_hash)

    def cached_block(self, block_hash: bytes) -> int | None:
        """The cached block named ``block_hash``, or None (never named, or evicted since)."""
        found = self.block_manager.lookup(as_hashes([block_hash]))
        return found[0] if found else None

    def num_blocks_to_append(self, seq_id: int, num_tokens: int = 1) -> int:
        """Blocks :meth:`append_slots` takes: new blocks, plus one copy-on-write of a shared partial block."""
        with self._lock:
            return self._blocks_to_append(self._get(seq_id), _count("num_tokens", num_tokens))

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        return self.block_manager.can_allocate(self.num_blocks_to_append(seq_id, num_tokens))

    def append_slots(self, seq_id: int, num_tokens: int) -> np.ndarray:
        """Reserve the next ``num_tokens`` positions of a sequence (copy-on-write included).

        Returns:
            [num_tokens] int64 slots of the new positions.
        Raises:
            OutOfBlocksError: not enough free blocks; nothing changed.
        """
        num_tokens = _count("num_tokens", num_tokens)
        with self._lock:
            seq = self._get(seq_id)
            need = self._blocks_to_append(seq, num_tokens)
            fresh = self.block_manager.allocate(need)  # all-or-nothing: raises before any change
            if self._last_block_needs_copy(seq):
                self._copy_on_write(seq, fresh.pop(0))
            seq.block_table.extend(fresh)
            start, seq.num_tokens = seq.num_tokens, seq.num_tokens + num_tokens
            return self._slots(seq, start, seq.num_tokens)

    def append_token(self, seq_id: int, *, k=None, v=None) -> int:
        """Reserve one more position; optionally write its ``k, v: [num_layers, num_kv_heads, head_dim]``."""
        check_kv(self.kv_cache, k, v, ())
        with self._lock:
            slot = int(self.append_slots(seq_id, 1)[0])
            if k is not None:
                seq = self._get(seq_id)
                self._write(seq, seq.num_tokens - 1, k[:, None], v[:, None])
            return slot

    def fork_sequence(self, seq_id: int) -> int:
        """A new sequence sharing every block of ``seq_id`` (ref counts + 1, no K/V copied)."""
        with self._lock:
            parent = self._get(seq_id)
            self.block_manager.share(parent.block_table)
            child = Sequence(next(self._next_id), list(parent.block_table), parent.num_tokens,
                             parent.num_cached_tokens)
            self._seqs[child.seq_id] = child
            return child.seq_id

    def free_sequence(self, seq_id: int) -> None:
        """Drop the sequence and one reference to each of its blocks.

        With prefix caching the table is released last block first, so a chain's tail joins the LRU
        before its head and is evicted first (a head evicted first would strand its whole tail).
        """
        with self._lock:
            seq = self._get(seq_id)
            table = seq.block_table[::-1] if self.block_manager.enable_prefix_caching else seq.block_table
            self.block_manager.free(table)
            del self._seqs[seq.seq_id]

    # -- reservations (static batching) ------------------------------------------------------------
    def reserve(self, owner, num_blocks: int) -> None:
        """Take ``num_blocks`` raw blocks for ``owner`` (a request id): held, in no sequence, until released.

        Raises:
            OutOfBlocksError: they do not fit; nothing changed.
        """
        with self._lock:
            blocks = self.block_manager.allocate(num_blocks)
            self._reserved.setdefault(owner, []).extend(blocks)

    def release_reserved(self, owner, num_blocks: int | None = None) -> int:
        """Give back ``num_blocks`` (default: all) of ``owner``'s reservation to the pool; returns how many."""
        with self._lock:
            held = self._reserved.get(owner, [])
            give = len(held) if num_blocks is None else min(num_blocks, len(held))
            if give:
                self.block_manager.free(held[-give:])
                del held[-give:]
            if not held:
                self._reserved.pop(owner, None)
            return give

    def num_reserved(self, owner) -> int:
        with self._lock:
            return len(self._reserved.get(owner, ()))

    # -- pool figures -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.block_manager.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Free blocks, evictable cached ones included (``allocate`` may hand them out)."""
        return self.block_manager.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.block_manager.num_used_blocks

    @property
    def enable_prefix_caching(self) -> bool:
        return self.block_manager.enable_prefix_caching

    def can_allocate(self, num_blocks: int) -> bool:
        return self.block_manager.can_allocate(num_blocks)

    def cache_counts(self) -> dict[str, int]:
        """The pool's cached / evictable blocks and evictions so far (prefix caching's gauges)."""
        bm = self.block_manager
        return {"num_cached_blocks": bm.num_cached_blocks, "num_evictable_blocks": bm.num_evictable_blocks,
                "num_evictions": bm.num_evictions}

    # -- per-sequence queries -----------------------------------------------------------------------
    def context_len(self, seq_id: int) -> int:
        with self._lock:
            return self._get(seq_id).num_tokens

    def num_cached_tokens(self, seq_id: int) -> int:
        """Tokens whose K/V came from the prefix cache when the sequence was added."""
        with self._lock:
            return self._get(seq_id).num_cached_tokens

    def block_table(self, seq_id: int) -> list[int]:
        with self._lock:
            return list(self._get(seq_id).block_table)

    def slots(self, seq_id: int, start: int, end: int) -> np.ndarray:
        """int64 slots of positions ``[start, end)`` of a sequence."""
        with self._lock:
            seq = self._get(seq_id)
            if not 0 <= start <= end <= seq.num_tokens:
                raise ValueError(f"positions [{start}, {end}) outside [0, {seq.num_tokens}] of sequence {seq_id}")
            return self._slots(seq, start, end)

    # -- batches ------------------------------------------------------------------------------------
    def block_tables(self, seq_ids) -> np.ndarray:
        """int32 ``[batch, max_blocks]``, each row a sequence's block table padded with 0."""
        with self._lock:
            seqs = self._get_many(seq_ids)
            width = max(len(s.block_table) for s in seqs)
            out = np.zeros((len(seqs), width), dtype=np.int32)
            for row, s in zip(out, seqs):
                row[: len(s.block_table)] = s.block_table
            return out

    def context_lens(self, seq_ids) -> np.ndarray:
        with self._lock:
            return np.array([s.num_tokens for s in self._get_many(seq_ids)], dtype=np.int32)

    def slot_mapping(self, seq_ids) -> np.ndarray:
        """int64 ``[batch]``: the slot of each sequence's last token (where a decode step writes)."""
        with self._lock:
            seqs = self._get_many(seq_ids)
            return np.array([s.slot(s.num_tokens - 1, self.block_size) for s in seqs], dtype=np.int64)

    def attention(self, q, seq_ids, layer: int, *, scale=None):
        """Decode attention of one new query per sequence over its cached K/V.

        Args:
            q: [batch, num_qo_heads, head_dim] on the cache's backend, the cache's dtype.
        Returns:
            [batch, num_qo_heads, head_dim].
        """
        xp = self.kv_cache.xp
        with self._lock:
            tables, lens = self.block_tables(seq_ids), self.context_lens(seq_ids)
            return ops.paged_attention(q, self.kv_cache.k_cache(layer), self.kv_cache.v_cache(layer),
                                       xp.asarray(tables), xp.asarray(lens), scale=scale)

    # -- accounting ---------------------------------------------------------------------------------
    def usage(self) -> Usage:
        """Pool figures; evictable cached blocks count as free (``allocate`` may hand them out), not used."""
        with self._lock:
            return measure_usage(list(self._seqs.values()), self.block_manager, self.block_size,
                                 self.kv_cache.bytes_per_block, self.num_cow_copies)

    def snapshot(self):
        """The manager's bookkeeping as values (the cache's bytes are not included)."""
        with self._lock:
            seqs = {i: (tuple(s.block_table), s.num_tokens) for i, s in self._seqs.items()}
            return self.block_manager.snapshot(), seqs, self.num_cow_copies

    # -- internals ----------------------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _last_block_needs_copy(self, seq: Sequence) -> bool:
        partial = seq.num_tokens % self.block_size != 0
        return partial and self.block_manager.ref_count(seq.block_table[-1]) > 1

    def _blocks_to_append(self, seq: Sequence, num_tokens: int) -> int:
        grow = self._blocks_for(seq.num_tokens + num_tokens) - len(seq.block_table)
        return grow + int(self._last_block_needs_copy(seq))

    def _copy_on_write(self, seq: Sequence, fresh: int) -> None:
        old = seq.block_table[-1]
        self.kv_cache.copy_blocks([old], [fresh])
        self.block_manager.free([old])
        seq.block_table[-1] = fresh
        self.num_cow_copies += 1

    def _slots(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        pos = np.arange(start, end, dtype=np.int64)
        table = np.asarray(seq.block_table, dtype=np.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _write(self, seq: Sequence, start: int, k, v) -> None:
        slots = self._slots(seq, start, start + k.shape[1])
        for layer in range(self.kv_cache.num_layers):
            self.kv_cache.write(layer, slots, k[layer], v[layer])

    def _cached_ids(self, cached_block_ids, num_tokens: int) -> list[int]:
        cached = as_ids(cached_block_ids)
        for b in cached:
            if isinstance(b, bool) or not isinstance(b, int):
                raise ValueError(f"cached block id {b!r} is not an int")
        if len(set(cached)) != len(cached):
            raise ValueError(f"cached_block_ids {cached!r} name a block twice")
        if len(cached) * self.block_size > num_tokens:
            raise ValueError(f"{len(cached)} cached blocks hold {len(cached) * self.block_size} tokens, "
                             f"more than num_tokens={num_tokens}")
        return cached

    def _get(self, seq_id) -> Sequence:
        """The sequence of an int id (a bool or a float is refused, although ``True == 1 == 1.0``)."""
        try:
            if isinstance(seq_id, bool):
                raise TypeError
            return self._seqs[operator.index(seq_id)]
        except (KeyError, TypeError):
            raise ValueError(f"unknown sequence id {seq_id!r}") from None

    def _get_many(self, seq_ids) -> list[Sequence]:
        seqs = [self._get(i) for i in seq_ids]
        if not seqs:
            raise ValueError("seq_ids is empty")
        return seqs


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


__all__ = ["PagedAttentionManager", "OutOfBlocksError"]
