"""Where a step's tokens, logits and samples go: the host side of one forward, built with vectorised NumPy.

Rows of the forward::

    decode-only step     one row per sequence (its pending token), logits for every row
    prefill / mixed      one row per new token, sequences concatenated; logits only for ``logit_rows``:
                         each prompt-logprob position, then each sampling sequence's last token

Samples: the sampled-token buffer holds one token per logits row (rows that do not sample are greedy and
ignored), then one per *extra* branch (a request's first token samples all ``n`` branches from one row)::

    logits rows   [ a | b | c ]        sampled   [ t_a | t_b | t_c | t_c' t_c'' ]    c: n = 3, first token
                                                   row i            extras from base = number of logits rows

A token that the step before is still sampling is a placeholder on the host: its row takes it from the
sampled buffer on the device (``src_rows``, the position the branch recorded when that step launched).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from ..request import PLACEHOLDER
from ..sched.step_plan import ScheduledSeq
from .logits_process import PROCESS, UPDATE
from .sampler import PARAM_FIELDS
from .seq_tables import SequenceTables, seed_of
from .step_inputs import InputViews


@dataclass(slots=True)
class Layout:
    """The host arrays of one step (``[rows]`` each unless said), before padding to a graph bucket.

    ``logit_rows`` [R]: rows whose logits the forward returns (None: every row, decode); ``sample_row[i]``:
    the logits row (= sampled position) of sequence ``i``'s first sampling branch, -1 if it does not sample;
    ``prompt_rows``: ``(logits row, request, prompt position)`` for prompt logprobs.
    """

    token_ids: np.ndarray
    src_rows: np.ndarray
    positions: np.ndarray
    seq_rows: np.ndarray  # per token row: its sequence's row in SequenceTables
    table_rows: np.ndarray  # [num_seqs]: each sequence's row in SequenceTables
    logit_rows: np.ndarray | None
    sample_row: np.ndarray  # [num_seqs]
    ends: np.ndarray  # [num_seqs]: tokens of each sequence after this step (sampling ``step`` = end - prompt)
    prompt_rows: list = field(default_factory=list)
    query_start_loc: np.ndarray | None = None  # [num_seqs + 1]: sequence i owns rows qsl[i]..qsl[i+1]-1

    @property
    def num_rows(self) -> int:
        return len(self.token_ids)

    @property
    def num_logits(self) -> int:
        return self.num_rows if self.logit_rows is None else len(self.logit_rows)


def decode_layout(seqs: list[ScheduledSeq], tables: SequenceTables) -> Layout:
    """One row per sequence, each feeding its one pending token."""
    num = len(seqs)
    starts = np.fromiter((s.start for s in seqs), dtype=np.int64, count=num)
    tokens = np.fromiter(map(_pending_token, seqs), dtype=np.int64, count=num)
    src = np.fromiter((s.branch.sample_pos for s in seqs), dtype=np.int64, count=num)
    rows = tables.rows(seqs)
    return Layout(*_split_placeholders(tokens, src), starts, rows, rows, None, np.arange(num, dtype=np.int64),
                  starts + 1)


def _pending_token(s: ScheduledSeq) -> int:
    p = s.request.prompt_token_ids
    return p[s.start] if s.start < len(p) else s.branch.output_token_ids[s.start - len(p)]


def _split_placeholders(tokens: np.ndarray, src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(token ids with placeholders as 0, source positions where a placeholder was, else -1)."""
    placeholder = tokens == PLACEHOLDER
    return np.where(placeholder, 0, tokens).astype(np.int32), np.where(placeholder, src, -1).astype(np.int32)


def prefill_layout(seqs: list[ScheduledSeq], tables: SequenceTables) -> Layout:
    """Every sequence's new tokens in a row each; logits rows for prompt logprobs and sampling sequences."""
    num = len(seqs)
    sizes = np.fromiter((s.num_tokens for s in seqs), dtype=np.int64, count=num)
    starts = np.fromiter((s.start for s in seqs), dtype=np.int64, count=num)
    offsets = np.cumsum(sizes) - sizes
    total = int(sizes.sum())
    tokens = np.fromiter(chain.from_iterable(s.token_ids() for s in seqs), dtype=np.int64, count=total)
    last = offsets + sizes - 1  # a placeholder can only be a sequence's last (pending decode) token
    src = np.full(total, -1, dtype=np.int64)
    src[last] = np.fromiter((s.branch.sample_pos for s in seqs), dtype=np.int64, count=num)
    if np.count_nonzero(tokens == PLACEHOLDER) != np.count_nonzero(tokens[last] == PLACEHOLDER):
        raise RuntimeError("a token still being sampled was scheduled inside a prefill chunk (a scheduler bug)")
    logit_rows, sample_row, prompt_rows = _logit_rows(seqs, offsets)
    positions = np.repeat(starts - offsets, sizes) + np.arange(total, dtype=np.int64)
    rows = tables.rows(seqs)
    return Layout(*_split_placeholders(tokens, src), positions, np.repeat(rows, sizes), rows,
                  np.asarray(logit_rows, dtype=np.int64), np.asarray(sample_row, dtype=np.int64), starts + sizes,
                  prompt_rows, np.r_[0, offsets + sizes])


def _logit_rows(seqs: list[ScheduledSeq], offsets: np.ndarray) -> tuple[list, list, list]:
    logit_rows, sample_row, prompt_rows = [], [], []
    for s, offset in zip(seqs, offsets.tolist()):
        for p in prompt_logprob_positions(s):
            prompt_rows.append((len(logit_rows), s.request, p + 1))
            logit_rows.append(offset + p - s.start)
        sample_row.append(len(logit_rows) if s.sample_branches else -1)
        if s.sample_branches:
            logit_rows.append(offset + s.num_tokens - 1)
    if not logit_rows:  # NOTE: no row samples (mid-prompt chunks only): one row anyway, never an empty product
        logit_rows.append(int(offsets[-1]) + seqs[-1].num_tokens - 1)
    return logit_rows, sample_row, prompt_rows


def prompt_logprob_positions(s: ScheduledSeq) -> range:
    """Positions of this chunk whose logits score the next prompt token (not yet scored)."""
    r = s.request
    if r.params.prompt_logprobs is None or r.prompt_logprobs is None:
        return range(0)
    first = max(s.start, len(r.prompt_logprobs) - 1)
    return range(first, min(s.end, r.prompt_len - 1))


def fill_rows(v: InputViews, lay: Layout, tables: SequenceTables, num_rows: int, row_tables: bool) -> None:
    """Token rows ``[0, num_rows)`` of ``v``: the layout's rows, then padding; with ``row_tables`` (the decode
    layout) each row's block table and context length too."""
    n = lay.num_rows
    v.token_ids[:n], v.src_rows[:n], v.positions[:n] = lay.token_ids, lay.src_rows, lay.positions
    v.slot_mapping[:n] = tables.slots(lay.seq_rows, lay.positions)
    if num_rows > n:
        v.token_ids[n:num_rows], v.src_rows[n:num_rows], v.positions[n:num_rows], v.slot_mapping[n:num_rows] = \
            0, -1, 0, -1
    if row_tables:
        v.context_lens[:n] = lay.positions + 1
        v.context_lens[n:num_rows] = 1
        np.take(tables.tables, lay.seq_rows, axis=0, out=v.block_tables[:n])


def fill_seqs(v: InputViews, lay: Layout, tables: SequenceTables, num_seqs: int) -> None:
    """The prefill layout's sequences ``[0, num_seqs)``: ``query_start_loc``, context lengths (new tokens
    included) and block tables, then padding sequences that own no row."""
    n = len(lay.table_rows)
    v.query_start_loc[:n + 1] = lay.query_start_loc
    v.query_start_loc[n + 1:num_seqs + 1] = lay.num_rows
    v.context_lens[:n] = lay.ends
    v.context_lens[n:num_seqs] = 1
    np.take(tables.tables, lay.table_rows, axis=0, out=v.block_tables[:n])


def fill_samples(v: InputViews, lay: Layout, seqs: list[ScheduledSeq], tables: SequenceTables,
                 num_logits: int) -> list[list[int]]:
    """Sampling rows: logits rows ``[0, num_logits)`` (greedy unless a sequence samples there), then the extra
    branches from ``num_logits`` on. Returns each sequence's sampled positions (one per sampling branch)."""
    v.temperature[:num_logits], v.flags[:num_logits] = 0, 0
    if lay.logit_rows is not None:
        v.logit_rows[:len(lay.logit_rows)] = lay.logit_rows
        v.logit_rows[len(lay.logit_rows):num_logits] = 0
    samples = lay.sample_row >= 0
    at, rows = lay.sample_row[samples], lay.table_rows[samples]
    v.seed[at], v.step[at] = tables.seed[rows], lay.ends[samples] - tables.prompt_len[rows]
    for f in PARAM_FIELDS:
        getattr(v, f.name)[at] = getattr(tables, f.name)[rows]
    flags = tables.flags[rows]
    v.flags[at], v.state_row[at] = flags, rows
    processed = (flags & PROCESS) != 0
    v.proc_row[at[processed]] = np.arange(np.count_nonzero(processed), dtype=np.int32)
    positions = [[p] if p >= 0 else [] for p in lay.sample_row.tolist()]
    extra = num_logits
    for i in np.flatnonzero(np.fromiter((len(s.sample_branches) > 1 for s in seqs), dtype=bool, count=len(seqs))):
        s = seqs[i]
        for b in s.sample_branches[1:]:
            _fill_extra(v, extra, s, b, tables, lay.sample_row[i], extra - num_logits)
            positions[i].append(extra)
            extra += 1
    return positions


def _fill_extra(v: InputViews, at: int, s: ScheduledSeq, branch, tables: SequenceTables, parent: int,
                proc_row: int) -> None:
    """An extra branch's first token: the parent row's logits, processed with the parent's state (not counted:
    the branch's own state row is made at its first step)."""
    p = s.request.params
    v.seed[at], v.step[at] = seed_of(branch, p, tables.rng), s.end - s.request.prompt_len
    for f in PARAM_FIELDS:
        getattr(v, f.name)[at] = f.of_params(p)
    v.flags[at], v.state_row[at] = v.flags[parent] & ~UPDATE, v.state_row[parent]
    v.proc_row[at], v.mask_row[at] = proc_row, v.mask_row[parent]
