"""The model runner's structured-output rows: each step's masks filled and uploaded, deferred rows sampled again.

    fill (launch)       the step's structured rows whose branch has every token on the host: masks from their
                        matchers into grammar rows [0, k), flags |= PROCESS | MASK, mask_row set (an extra branch's
                        first token takes its parent's); rows whose last token is still in flight are ``deferred``
    resample (finish)   once the step before is retired: the deferred rows' masks, and those rows sampled again
                        from the step's logits (their other fields as launched) into the sampled buffer

Every host->device copy here comes from pinned memory (two buffers taking turns, an event each): a copy from
pageable memory would wait for the forward running on the stream, and the masks are computed while it runs.
"""
from __future__ import annotations

import numpy as np

from .logits_process import MASK, PROCESS, UPDATE
from .sampler import ROW_BYTES, SAMPLING_FIELDS, SamplingTensors, sample


class StructuredRows:
    """Args: xp (numpy or cupy), state: the runner's LogitsState (its ``grammar`` rows), max_rows: the most
    sampling rows of a step (max_num_seqs). ``grammars``: the engine's Grammars (None: no structured request)."""

    def __init__(self, xp, state, max_rows: int):
        self.xp, self.state, self.max_rows = xp, state, max_rows
        self.grammars = None
        self.deferred: list[int] = []
        self._mask_hosts, self._mask_turn, self._stage, self._staged = None, 0, None, None

    def fill(self, v, seqs, positions, num_logits: int) -> None:
        """Bitmasks of the structured requests' sampling rows (their branches' matchers), flags and mask rows
        set, processed rows renumbered; on a GPU one host->device copy of the masks (current stream). Rows whose
        branch's last token is still in flight are deferred (``self.deferred``: :meth:`resample` them later)."""
        self.deferred = []
        if self.grammars is None:
            return
        found = [i for i, s in enumerate(seqs) if positions[i] and s.request.params.structured_outputs is not None]
        self.grammars.release()
        self.deferred = [i for i in found if _in_flight(seqs[i].branch)]
        found = [i for i in found if not _in_flight(seqs[i].branch)]
        if not found:
            return
        self.upload_masks([(seqs[i].request, seqs[i].branch) for i in found])
        for row, i in enumerate(found):
            for pos in positions[i]:  # NOTE: extra branches' first token: the parent's mask
                v.flags[pos] |= PROCESS | MASK
                v.mask_row[pos] = row
        processed = np.flatnonzero(v.flags[:num_logits] & PROCESS)
        v.proc_row[processed] = np.arange(len(processed), dtype=np.int32)

    def upload_masks(self, rows: list):
        """Masks of ``rows`` ((request, branch) each) into the device's grammar rows ``[0, len(rows))``: filled
        into one of two pinned host buffers (waiting for its previous copy), one copy on the current stream."""
        state, k = self.state, len(rows)
        if self.xp is np:
            self.grammars.fill(rows, state.grammar[:k].view(np.int32))
            return state.grammar
        import cupyx

        if self._mask_hosts is None:
            self._mask_hosts = [[cupyx.empty_pinned(state.grammar.shape, dtype=np.uint32), None] for _ in range(2)]
        self._mask_turn ^= 1
        entry = self._mask_hosts[self._mask_turn]
        if entry[1] is not None:
            entry[1].synchronize()
        self.grammars.fill(rows, entry[0][:k].view(np.int32))
        stream = self.xp.cuda.get_current_stream()
        state.grammar[:k].set(entry[0][:k], stream=stream)
        entry[1] = self.xp.cuda.Event(block=False, disable_timing=True)
        entry[1].record(stream)
        return entry[0]

    def resample(self, logits, host, deferred: list, positions, seqs, sampled) -> None:
        """Sample the deferred structured rows again, now with their masks (their other fields as launched). Its
        inputs travel through pinned staging (a pageable host->device copy would wait for the running forward)."""
        xp, n = self.xp, len(deferred)
        at = np.array([positions[i][0] for i in deferred], dtype=np.int64)
        self.upload_masks([(seqs[i].request, seqs[i].branch) for i in deferred])
        t, index, tensors, d_index = self._staging()
        for name in (f.name for f in SAMPLING_FIELDS):
            getattr(t, name)[:n] = getattr(host, name)[at]
        t.flags[:n] = (t.flags[:n] & ~UPDATE) | PROCESS | MASK
        t.proc_row[:n] = t.mask_row[:n] = np.arange(n, dtype=np.int32)
        index[:n] = at
        if xp is not np:
            stream = xp.cuda.get_current_stream()
            tensors.raw.set(t.raw, stream=stream)
            d_index.set(index, stream=stream)
            self._staged = xp.cuda.Event(block=False, disable_timing=True)
            self._staged.record(stream)
        out = xp.empty(n, dtype=np.int32)
        processed = xp.empty((n, logits.shape[1]), dtype=np.float32)
        sample(logits[d_index[:n]], tensors, out=out, state=self.state, processed=processed)
        sampled[d_index[:n]] = out

    def _staging(self):
        """(host tensors, host index, device tensors, device index) of ``max_num_seqs`` rows; on a GPU the host
        side is pinned and reused once its last copy has been done."""
        if self._stage is None:
            rows = self.max_rows
            if self.xp is np:
                t = SamplingTensors.allocate(rows)
                self._stage = (t, np.zeros(rows, dtype=np.int64), t, None)
            else:
                import cupyx

                host = SamplingTensors.on_buffer(cupyx.empty_pinned(ROW_BYTES * rows, dtype=np.uint8))
                self._stage = (host, cupyx.empty_pinned(rows, dtype=np.int64),
                               SamplingTensors.allocate(rows, self.xp), self.xp.zeros(rows, dtype=np.int64))
        if self._staged is not None:
            self._staged.synchronize()
            self._staged = None
        t, index, tensors, d_index = self._stage
        return t, index, tensors, index if d_index is None else d_index



def _in_flight(branch) -> bool:
    """The branch's last output token is still being sampled (its value is not on the host yet)."""
    return branch.num_known_outputs() < len(branch.output_token_ids)
