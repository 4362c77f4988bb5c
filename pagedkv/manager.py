"""PagedAttentionManager: sequences on a paged KV cache, with fork and copy-on-write."""
from __future__ import annotations

import threading
from itertools import count

import numpy as np

from . import ops
from .block_manager import BlockManager, OutOfBlocksError
from .kv_cache import KVCache
from .sequence import Sequence
from .usage import Usage


class PagedAttentionManager:
    """Registers sequences, reserves their token slots block by block, forks and frees them.

    ``fork_sequence`` copies a block *table* and adds a reference to every block; no K/V moves.
    Copy-on-write: reserving a slot in a last, partial block whose ``ref_count > 1`` first takes a
    fresh block, copies the shared one into it (every layer), drops one reference to the old block
    and then hands out the slot. Full blocks are never written again, so they are never copied::

        parent [ A: t0..t3 ][ B: t4 t5 . . ]      fork ->  child shares A (ref 2) and B (ref 2)
        child.append_token  ->  B' = copy of B;  child [ A ][ B': t4 t5 t6' . ];  B ref 1

    Every method is thread-safe (one re-entrant lock) and all-or-nothing: a call that raises
    ``ValueError`` (``OutOfBlocksError`` included) leaves the manager, the allocator and the cache
    exactly as they were.
    """

    def __init__(self, kv_cache: KVCache):
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.block_manager = BlockManager(kv_cache.num_blocks, kv_cache.block_size)
        self._seqs: dict[int, Sequence] = {}
        self._next_id = count()
        self._lock = threading.RLock()
        self.num_cow_copies = 0

    @classmethod
    def create(cls, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype="float16",
               device="auto") -> "PagedAttentionManager":
        return cls(KVCache(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device))

    # -- sequences ----------------------------------------------------------------------------------
    @property
    def seq_ids(self) -> list[int]:
        with self._lock:
            return list(self._seqs)

    def can_add(self, num_tokens: int) -> bool:
        return self.block_manager.can_allocate(self._blocks_for(_count("num_tokens", num_tokens)))

    def add_sequence(self, num_tokens: int, *, k=None, v=None) -> int:
        """Register a sequence of ``num_tokens`` tokens and reserve ``ceil(num_tokens / block_size)`` blocks.

        Args:
            num_tokens: >= 1.
            k, v: optional ``[num_layers, num_tokens, num_kv_heads, head_dim]`` K/V to write.
        Returns:
            the new sequence id.
        """
        num_tokens = _count("num_tokens", num_tokens)
        self._check_kv(k, v, (num_tokens,))
        with self._lock:
            block_table = self.block_manager.allocate(self._blocks_for(num_tokens))  # raises before any change
            seq = Sequence(next(self._next_id), block_table, num_tokens)
            self._seqs[seq.seq_id] = seq
            if k is not None:
                self._write(seq, 0, k, v)
            return seq.seq_id

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        with self._lock:
            need = self._blocks_to_append(self._get(seq_id), _count("num_tokens", num_tokens))
            return self.block_manager.can_allocate(need)

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
        self._check_kv(k, v, ())
        with self._lock:
            slot = int(self.append_slots(seq_id, 1)[0])
            if k is not None:
                seq = self._seqs[seq_id]
                self._write(seq, seq.num_tokens - 1, k[:, None], v[:, None])
            return slot

    def fork_sequence(self, seq_id: int) -> int:
        """A new sequence sharing every block of ``seq_id`` (ref counts + 1, no K/V copied)."""
        with self._lock:
            parent = self._get(seq_id)
            self.block_manager.share(parent.block_table)
            child = Sequence(next(self._next_id), list(parent.block_table), parent.num_tokens)
            self._seqs[child.seq_id] = child
            return child.seq_id

    def free_sequence(self, seq_id: int) -> None:
        with self._lock:
            seq = self._get(seq_id)
            self.block_manager.free(seq.block_table)
            del self._seqs[seq_id]

    # -- per-sequence queries -----------------------------------------------------------------------
    def context_len(self, seq_id: int) -> int:
        with self._lock:
            return self._get(seq_id).num_tokens

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
        with self._lock:
            filled: dict[int, int] = {}
            for s in self._seqs.values():
                for i, b in enumerate(s.block_table):
                    filled[b] = max(filled.get(b, 0), min(self.block_size, s.num_tokens - i * self.block_size))
            bm = self.block_manager
            _, refs = bm.snapshot()
            return Usage(
                num_blocks=bm.num_blocks, num_used_blocks=bm.num_used_blocks, num_free_blocks=bm.num_free_blocks,
                num_token_slots_used=sum(filled.values()),
                num_token_slots_reserved=bm.num_used_blocks * self.block_size,
                num_logical_tokens=sum(s.num_tokens for s in self._seqs.values()),
                bytes_per_block=self.kv_cache.bytes_per_block,
                num_shared_blocks=sum(1 for r in refs if r > 1),
                num_cow_copies=self.num_cow_copies, num_sequences=len(self._seqs),
            )

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

    def _check_kv(self, k, v, token_shape: tuple) -> None:
        """k/v must both be given or both omitted, with shape [num_layers, *token_shape, H, D], cache dtype."""
        if (k is None) != (v is None):
            raise ValueError("give both k and v, or neither")
        if k is None:
            return
        c = self.kv_cache
        want = (c.num_layers, *token_shape, c.num_kv_heads, c.head_dim)
        for name, x in (("k", k), ("v", v)):
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                raise ValueError(f"{name} must be an array of shape {want}, got {type(x).__name__}")
            if tuple(x.shape) != want:
                raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
            if x.dtype != c.dtype:
                raise ValueError(f"{name} dtype {x.dtype} differs from the cache dtype {c.dtype}")

    def _get(self, seq_id) -> Sequence:
        try:
            return self._seqs[seq_id]
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
