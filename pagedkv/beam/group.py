"""Beam search on the paged KV cache: one group of prompts searched together, step by step.

Each live beam owns one manager sequence (prompt + generated tokens). As in the engine, a sequence's last
token is *pending*: its K/V is written by the next decode forward, which also yields the next logits. One step::

    decode forward    one row per live beam of every prompt of the group (the runner's decode batch)
    candidates        log-softmax in float32 on the device; the 2 * beam_width best tokens of each row
    select            per prompt (vLLM's rules): an EOS candidate finishes (unless ignore_eos); of the
                      others, the beam_width best scores continue
    blocks            a parent that no child continues: free_sequence at once
                      the first child continues in its parent's sequence, the others fork it (blocks
                      shared, ref counts + 1, no K/V copied); then each child reserves its new token's slot:
                      copy-on-write of the shared partial last block, the only block ever copied

    block_size 4, prompt p0..p5; a beam that generated a, b holds   [A: p0 p1 p2 p3][B: p4 p5 a b]
    its children +c, +d: the first keeps the sequence, one fork     [A][B][C: c . . .]    A, B full: shared
                         each reserves a slot in a new block        [A][B][D: d . . .]    C, D: own blocks
    the children of +c: +e, +f (C is shared and partial)            [A][B][C': c e . .]   copy-on-write
                                                                    [A][B][C:  c f . .]   written in place

So the live beams of a prompt hold exactly one block per distinct token prefix of each block (the prompt's
full blocks once, whatever the beam width). Finished beams (EOS, or max_tokens) hold no blocks. Any exception
frees every sequence the search holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..backend import array_module, to_numpy
from ..model import PrefillBatch
from .handle import EngineHandle


@dataclass(slots=True)
class Beam:
    """One hypothesis: its generated tokens, their log-probabilities, and its sequence while it is live."""

    prompt_index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cum_logprob: float = 0.0
    seq_id: int | None = None
    finish_reason: str | None = None  # "stop" (ended with EOS) or "length" (max_tokens)

    def child(self, token_id: int, logprob: float) -> Beam:
        return Beam(self.prompt_index, self.token_ids + [token_id], self.logprobs + [logprob],
                    self.cum_logprob + logprob)

    def score(self, prompt_len: int, length_penalty: float) -> float:
        """vLLM's ``get_beam_search_score``: ``cum_logprob / length ** length_penalty`` where ``length`` counts
        the prompt and the generated tokens, an ending EOS not included."""
        return beam_score(self.cum_logprob, prompt_len + len(self.token_ids) - (self.finish_reason == "stop"),
                          length_penalty)


def beam_score(cum_logprob: float, length: int, length_penalty: float) -> float:
    return cum_logprob / length ** length_penalty


def top_candidates(logits, num: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``num`` most likely tokens of each row, best first (equal log-probabilities: lower id first).

    Args:
        logits: [rows, vocab] on the device, any float dtype.
    Returns:
        host arrays ids [rows, num] int64 and logprobs [rows, num] float32 (log-softmax in float32, computed
        on the device; only the ``rows x num`` candidates are copied to the host).
    """
    xp = array_module(logits)
    x = logits.astype(np.float32)
    x = x - x.max(axis=-1, keepdims=True)
    lp = x - xp.log(xp.exp(x).sum(axis=-1, keepdims=True))
    num = min(num, lp.shape[-1])
    idx = xp.argpartition(-lp, num - 1, axis=-1)[:, :num]
    ids, vals = to_numpy(idx).astype(np.int64), to_numpy(xp.take_along_axis(lp, idx, axis=-1))
    order = np.lexsort((ids, -vals), axis=-1)
    return np.take_along_axis(ids, order, axis=-1), np.take_along_axis(vals, order, axis=-1)


class BeamGroup:
    """The beam search of a group of prompts on ``engine``'s manager, model and KV cache.

    Args:
        prompts: token id lists, validated, whose worst case fits the pool (see ``beam_search``).
        params: a ``BeamSearchParams``; eos_token_ids: ids that finish a beam (unless ``params.ignore_eos``).
        share_blocks: False makes every child a full copy of its parent (its own blocks, K/V copied): the
            no-sharing baseline of ``experiments.memory_share``; the search and its results are the same.
        hasher: a ``BlockHasher`` when the manager caches prefixes: prompts start on their cached blocks,
            and their full blocks are named once prefilled.

    Drive it with :meth:`start` then :meth:`step` until :attr:`done`, or :meth:`run`; :attr:`finished` holds
    each prompt's finished beams. On an exception call :meth:`release` (``run`` does).
    """

    def __init__(self, engine, prompts: list[list[int]], params, eos_token_ids: frozenset[int], *,
                 share_blocks: bool = True, hasher=None):
        self.engine = EngineHandle.of(engine)
        self.manager, self.params = self.engine.manager, params
        self.prompts, self.eos = prompts, frozenset(() if params.ignore_eos else eos_token_ids)
        self.share_blocks, self.hasher = share_blocks, hasher
        self.live: list[Beam] = []
        self.finished: list[list[Beam]] = [[] for _ in prompts]
        self.num_generated = 0
        self._owned: set[int] = set()  # every sequence the search holds now

    @property
    def done(self) -> bool:
        return self.num_generated > 0 and not self.live

    def run(self) -> list[list[Beam]]:
        try:
            self.start()
            while not self.done:
                self.step()
        except BaseException:
            self.release()
            raise
        return self.finished

    def start(self) -> None:
        """Prefill the prompts (one sequence each) and take the first tokens."""
        self._advance(self._prefill())

    def step(self) -> None:
        """One decode forward over every live beam, then selection and block moves."""
        m, seq_ids = self.manager, [b.seq_id for b in self.live]
        tokens = np.array([b.token_ids[-1] for b in self.live], dtype=np.int32)
        tables, lens, slots = m.block_tables(seq_ids), m.context_lens(seq_ids), m.slot_mapping(seq_ids)
        self._advance(self.engine.decode_logits(tokens, lens, tables, slots))

    def release(self) -> None:
        """Free every sequence the search holds (after an error: the pool is as before the search)."""
        for seq_id in sorted(self._owned):
            self.manager.free_sequence(seq_id)
        self._owned.clear()
        self.live = []

    # ------------------------------------------------------------------------------------ selection
    def _advance(self, logits) -> None:
        """Logits row ``i`` belongs to ``self.live[i]`` (the parents): pick the children, move the blocks."""
        ids, lps = top_candidates(logits, 2 * self.params.beam_width)
        self.num_generated += 1
        last = self.num_generated == self.params.max_tokens
        picks: list[tuple[int, Beam]] = []
        for i in range(len(self.prompts)):
            rows = [r for r, b in enumerate(self.live) if b.prompt_index == i]
            picks += self._select(i, rows, ids, lps)
        self._move_blocks(picks, last)
        children = [child for _, child in picks]
        if last:
            for child in children:
                child.finish_reason = "length"
                self.finished[child.prompt_index].append(child)
            children = []
        self.live = children

    def _select(self, prompt_index: int, rows: list[int], ids, lps) -> list[tuple[int, Beam]]:
        """vLLM's rule for one prompt: EOS candidates finish; the beam_width best other candidates continue.
        Returns ``(parent row, child)`` pairs, best first (equal scores: earlier parent, likelier token)."""
        p, candidates = self.params, []
        prompt_len = len(self.prompts[prompt_index])
        for row in rows:
            for token, lp in zip(ids[row].tolist(), lps[row].tolist()):
                child = self.live[row].child(token, lp)
                if token in self.eos:
                    child.finish_reason = "stop"
                    self.finished[prompt_index].append(child)
                else:
                    candidates.append((child.score(prompt_len, p.length_penalty), row, child))
        candidates.sort(key=lambda c: c[0], reverse=True)  # NOTE: stable, so ties keep the order above
        return [(row, child) for _, row, child in candidates[:p.beam_width]]

    def _move_blocks(self, picks: list[tuple[int, Beam]], last: bool) -> None:
        """Free parents no child continues (all of them after the last token), hand each parent's sequence to
        its first child, fork it for the others, then reserve every child's new slot (copy-on-write)."""
        children: dict[int, list[Beam]] = {}
        for row, child in picks:
            children.setdefault(row, []).append(child)
        for row, parent in enumerate(self.live):
            if last or row not in children:
                self._free(parent.seq_id)
        if last:
            return
        for row, kids in children.items():
            seq_id = self.live[row].seq_id
            kids[0].seq_id = seq_id
            for kid in kids[1:]:
                kid.seq_id = self._fork(seq_id)
        for _, child in picks:
            self.manager.append_slots(child.seq_id, 1)

    # ------------------------------------------------------------------------------ sequences
    def _free(self, seq_id: int) -> None:
        self.manager.free_sequence(seq_id)
        self._owned.discard(seq_id)

    def _fork(self, seq_id: int) -> int:
        m = self.manager
        if self.share_blocks:
            child = m.fork_sequence(seq_id)
            self._owned.add(child)
        else:  # NOTE: the baseline: a private copy of every block (every layer's K/V copied)
            child = m.add_sequence(m.context_len(seq_id))
            self._owned.add(child)  # before the copy: freed if it fails
            m.kv_cache.copy_blocks(m.block_table(seq_id), m.block_table(child))
        return child

    def _prefill(self):
        """One sequence per prompt (on its cached blocks when the manager caches prefixes), its uncached
        tokens run through ``model.prefill`` in forwards of at most ``max_num_batched_tokens`` tokens.
        Returns the logits of each prompt's last token: [num_prompts, vocab]."""
        parts = []
        for i, prompt in enumerate(self.prompts):
            hashes, cached = self._lookup(prompt)
            seq_id = self.manager.add_sequence(len(prompt), cached_block_ids=cached)
            self._owned.add(seq_id)
            self.live.append(Beam(i, seq_id=seq_id))
            parts.append((seq_id, prompt, len(cached) * self.manager.block_size, hashes))
        budget = self.engine.max_num_batched_tokens
        logits = [self._forward(chunk) for chunk in _chunks(parts, budget)]
        for seq_id, prompt, _, hashes in parts:
            if hashes:
                self.manager.register_blocks(seq_id, hashes)
        xp = self.engine.model.xp
        return logits[0] if len(logits) == 1 else xp.concatenate(logits)

    def _lookup(self, prompt: list[int]) -> tuple[list, list[int]]:
        """(hashes of the prompt's full blocks, cached blocks to start on); nothing without caching."""
        if self.hasher is None or not self.manager.enable_prefix_caching:
            return [], []
        hashes = self.hasher.hash_full_blocks(prompt, self.manager.block_size)
        return hashes, self.manager.lookup(hashes, len(prompt))

    def _forward(self, parts):
        m = self.manager
        new = [(seq_id, prompt[start:], start) for seq_id, prompt, start, _ in parts]
        batch = PrefillBatch(
            token_ids=np.concatenate([np.asarray(t, dtype=np.int64) for _, t, _ in new]),
            positions=np.concatenate([np.arange(s, s + len(t), dtype=np.int64) for _, t, s in new]),
            slot_mapping=np.concatenate([m.slots(i, s, s + len(t)) for i, t, s in new]),
            seq_lens=[len(t) for _, t, _ in new], num_cached=[s for _, _, s in new],
            block_tables=[m.block_table(i) for i, _, _ in new])
        return self.engine.model.prefill(batch, self.engine.kv_cache)


def _chunks(parts: list, budget: int):
    """Consecutive parts whose new tokens add up to at most ``budget`` (a longer one alone)."""
    chunk, size = [], 0
    for part in parts:
        n = len(part[1]) - part[2]
        if chunk and size + n > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(part)
        size += n
    if chunk:
        yield chunk



def worst_case_blocks(prompt_len: int, max_tokens: int, beam_width: int, block_size: int, share: bool) -> int:
    """The most blocks a prompt's search ever holds: the prompt's full blocks once (shared) plus every beam's
    own blocks at its longest (``prompt_len + max_tokens - 1`` tokens: the last token is never fed)."""
    blocks = lambda n: -(-n // block_size)  # noqa: E731
    if max_tokens == 1:
        return blocks(prompt_len)
    longest = blocks(prompt_len + max_tokens - 1)
    if not share:
        return beam_width * longest
    shared = prompt_len // block_size
    return shared + beam_width * (longest - shared)


__all__ = ["Beam", "BeamGroup", "beam_score", "top_candidates", "worst_case_blocks"]
