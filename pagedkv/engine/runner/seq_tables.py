"""Per-sequence host rows kept between steps: block table, prompt length and sampling parameters.

A sequence gets a row the first time a step schedules it; its table is rewritten only when the step plan
carries a new one (a new sequence, a new block, a copy-on-write, a fork: ``SchedulerOutput.block_tables``;
the runner never reads the manager) and the row is recycled when the sequence is freed. A step's batch
arrays are gathered from these rows with fancy indexing, so a decode step costs no Python loop over blocks::

    rows (a step)      [4, 0, 2]                 tables [capacity, max_blocks]   row 0: [ 7  3  9  0 ...]
    block_tables  =    tables[rows]              (one NumPy take)                row 2: [ 5  1  0  0 ...]
    slot_mapping  =    tables[rows, pos // bs] * bs + pos % bs                   row 4: [ 8  0  0  0 ...]

Sampling parameters are stored per row too (the branch's seed is drawn once), so the sampler's per-row
arrays are gathered the same way.
"""
from __future__ import annotations

import numpy as np

from .logits_process import PROCESS, STATE, UPDATE, needs_state
from .sampler import PARAM_FIELDS, branch_seed

_PARAMS = (("seed", np.uint64), *((f.name, f.dtype) for f in PARAM_FIELDS), ("prompt_len", np.int64),
           ("flags", np.int32))


class SequenceTables:
    """Args:
        block_size: tokens per block.
        max_blocks: the widest block table (``ceil(max_model_len / block_size)``).
        capacity: rows to start with (grows when more sequences are live).
        rng: draws the seed of branches whose request has none.
        on_state_row: ``(row, scheduled seq)``, called when a sequence whose parameters need device state
            (penalties, logit_bias, bad_words, ...) gets a row; its ``flags`` then say so.
    """

    def __init__(self, block_size: int, max_blocks: int, capacity: int, rng: np.random.Generator,
                 on_state_row=None):
        self.block_size, self.max_blocks, self.rng, self.on_state_row = block_size, max_blocks, rng, on_state_row
        self.row_of: dict[int, int] = {}
        self._pending: dict[int, list[int]] = {}  # tables of sequences without a row yet
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

    def update(self, block_tables: dict[int, list[int]], freed) -> None:
        """Apply the step plan's table changes: freed sequences give their row back, changed ones get their new
        table (kept aside until their first step when they have no row yet)."""
        for seq_id in freed:
            self._pending.pop(seq_id, None)
            row = self.row_of.pop(seq_id, None)
            if row is not None:
                self._free.append(row)
        for seq_id, table in block_tables.items():
            row = self.row_of.get(seq_id)
            if row is None:
                self._pending[seq_id] = table
            else:
                self._load(table, row)

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
        table = self._pending.pop(s.branch.seq_id, None)
        if table is None:
            raise RuntimeError(f"sequence {s.branch.seq_id} is scheduled but no step plan carried its block table")
        self._load(table, row)
        p = s.request.params
        self.seed[row], self.prompt_len[row] = seed_of(s.branch, p, self.rng), s.request.prompt_len
        for f in PARAM_FIELDS:
            getattr(self, f.name)[row] = f.of_params(p)
        self.flags[row] = PROCESS | STATE | UPDATE if needs_state(p) and self.on_state_row is not None else 0
        if self.flags[row]:
            self.on_state_row(row, s)
        return row

    @property
    def capacity(self) -> int:
        return int(self.tables.shape[0])

    def _load(self, table: list[int], row: int) -> None:
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
