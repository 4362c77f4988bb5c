"""Per-sequence host rows kept between steps: block table, prompt length and sampling parameters.

A sequence gets a row the first time a step schedules it; its table is re-read from the manager only when
the scheduler reports a change (a new sequence, a new block, a copy-on-write, a fork) and the row is recycled
when the sequence is freed. A step's batch arrays are gathered from these rows with fancy indexing, so a
decode step costs no Python loop over blocks::

    rows (a step)      [4, 0, 2]                 tables [capacity, max_blocks]   row 0: [ 7  3  9  0 ...]
    block_tables  =    tables[rows]              (one NumPy take)                row 2: [ 5  1  0  0 ...]
    slot_mapping  =    tables[rows, pos // bs] * bs + pos % bs                   row 4: [ 8  0  0  0 ...]

Sampling parameters are stored per row too (the branch's seed is drawn once), so the sampler's per-row
arrays are gathered the same way.
"""
from __future__ import annotations

import numpy as np

from .logits_process import PROCESS, STATE, UPDATE, needs_state
from .sampler import PARAM_FIELDS, ROW_FIELDS, branch_seed, row_values

_PARAMS = (("seed", np.uint64), *((n, dt) for n, dt in ROW_FIELDS if n in PARAM_FIELDS), ("prompt_len", np.int64),
           ("flags", np.int32))


class SequenceTables:
    """Args:
        manager: the paged KV cache's sequences (block tables are read from it on changes only).
        max_blocks: the widest block table (``ceil(max_model_len / block_size)``).
        capacity: rows to start with (grows when more sequences are live).
        rng: draws the seed of branches whose request has none.
        on_state_row: ``(row, scheduled seq)``, called when a sequence whose parameters need device state
            (penalties, logit_bias, bad_words, ...) gets a row; its ``flags`` then say so.
    """

    def __init__(self, manager, max_blocks: int, capacity: int, rng: np.random.Generator, on_state_row=None):
        self.manager, self.max_blocks, self.rng, self.on_state_row = manager, max_blocks, rng, on_state_row
        self.block_size = manager.block_size
        self.row_of: dict[int, int] = {}
        self.tables = np.zeros((0, max_blocks), dtype=np.int32)
        self._free: list[int] = []
        for name, dtype in _PARAMS:
            setattr(self, name, np.zeros(0, dtype=dtype))
        self._grow(max(capacity, 1))

    def _grow(self, capacity: int) -> None:
        old = self.tables.shape[0]
        self.tables = np.concatenate([self.tables, np.zeros((capacity - old, self.max_blocks), np.int32)])
        for name, dtype in _PARAMS:
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(capacity - old, dtype)]))
        self._free.extend(range(capacity - 1, old - 1, -1))

    def update(self, changed, freed) -> None:
        """Apply the scheduler's report: freed sequences give their row back, changed ones re-read their table."""
        for seq_id in freed:
            row = self.row_of.pop(seq_id, None)
            if row is not None:
                self._free.append(row)
        for seq_id in changed:
            row = self.row_of.get(seq_id)
            if row is not None:
                self._load(seq_id, row)

    def rows(self, seqs) -> np.ndarray:
        """int64 [len(seqs)]: each scheduled sequence's row (made at its first step)."""
        row_of, add = self.row_of, self._add
        return np.fromiter((row_of[s.branch.seq_id] if s.branch.seq_id in row_of else add(s) for s in seqs),
                           dtype=np.int64, count=len(seqs))

    def _add(self, s) -> int:
        if not self._free:
            self._grow(2 * self.tables.shape[0])
        row = self._free.pop()
        self.row_of[s.branch.seq_id] = row
        self.tables[row] = 0
        self._load(s.branch.seq_id, row)
        p = s.request.params
        self.seed[row] = seed_of(s.branch, p, self.rng)
        for name, value in zip(PARAM_FIELDS, row_values(p)):
            getattr(self, name)[row] = value
        self.prompt_len[row] = s.request.prompt_len
        self.flags[row] = PROCESS | STATE | UPDATE if needs_state(p) and self.on_state_row is not None else 0
        if self.flags[row]:
            self.on_state_row(row, s)
        return row

    @property
    def capacity(self) -> int:
        return int(self.tables.shape[0])

    def _load(self, seq_id: int, row: int) -> None:
        table = self.manager.block_table(seq_id)
        self.tables[row, :len(table)] = table

    def slots(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """int64 cache slots of ``positions`` of the sequences in ``rows`` (same length)."""
        bs = self.block_size
        return self.tables[rows, positions // bs].astype(np.int64) * bs + positions % bs


def seed_of(branch, params, rng: np.random.Generator) -> int:
    """The branch's sampler seed, drawn once (0 for greedy requests, which draw nothing)."""
    if params.greedy:
        return 0
    if branch.seed is None:
        branch.seed = branch_seed(params, branch.index, rng)
    return branch.seed
