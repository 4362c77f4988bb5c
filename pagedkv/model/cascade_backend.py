"""The decode attention choice of a step: plain paged decode, or cascade when the step's rows share long prefixes.

The model runner hands every decode step's host block tables and context lengths to :meth:`CascadeBackend.prepare`
before it uploads the step; the backend finds the groups (:func:`pagedkv.cascade.find_groups`), asks its rule
whether cascade pays, and if so writes the plan into its static device buffers (one host→device copy on the
current stream) and returns a *variant* (an opaque key: the runner keeps one CUDA graph per bucket and variant).
:meth:`attention` is then the decode attention the forward uses. Nothing else knows whether a step used cascade.

Device buffer (int32, shapes fixed at construction so captured graphs read it at every replay)::

    group_starts [max_groups + 1] | prefix_lens [max_groups] | group_rows [max_rows] | suffix_starts [max_rows]

Unused groups are empty (their start = the total) with prefix 0; rows of no group (padding rows included) have
suffix start 0, so every replay reads a consistent plan whatever the bucket.
"""
from __future__ import annotations

import numpy as np

from .. import cascade
from ..cascade import CascadeRule

ENGINE_HEAD_DIMS = (64, 128)  # where the engine turns cascade on (measured on the H100; NOTES_cascade.md)
MAX_GROUPS = 16  # groups per step (NOTE: the prefix kernel's grid grows with it; more groups: largest savings kept)
CASCADE = "cascade"  # the variant key of a cascade step (None: plain decode)


class CascadeBackend:
    """Args:
        xp: numpy (host: the float64 reference runs) or cupy.
        max_rows: the most decode rows of a step (the runner's ``max_num_seqs``).
        block_size: the KV pool's block size.
        head_dim: the model's; on a GPU cascade stays off outside :data:`ENGINE_HEAD_DIMS`.
        enabled: False: :meth:`prepare` always answers plain decode.
        rule: when cascade pays (default :class:`~pagedkv.cascade.CascadeRule`).
    """

    def __init__(self, xp, max_rows: int, block_size: int, *, head_dim: int | None = None, enabled: bool = True,
                 rule: CascadeRule | None = None):
        self.on_gpu = xp is not np
        self.xp, self.block_size = xp, block_size
        self.enabled = enabled and (not self.on_gpu or head_dim in ENGINE_HEAD_DIMS)
        self.rule = rule or CascadeRule()
        self.max_rows, self.max_groups = max_rows, max(1, min(MAX_GROUPS, max_rows // 2))
        self.num_cascade_steps = 0
        g, r = self.max_groups, max_rows
        self._sizes = (g + 1, g, r, r)
        total = sum(self._sizes)
        if self.on_gpu:
            import cupyx

            self._hosts = [cupyx.empty_pinned(total, dtype=np.int32) for _ in range(2)]
            self._copied = [None, None]
            self._device = xp.zeros(total, dtype=np.int32)
        else:
            self._hosts = [np.zeros(total, dtype=np.int32)]
            self._device = self._hosts[0]
        self._turn = 0
        self.group_starts, self.prefix_lens, self.group_rows, self.suffix_starts = self._views(self._device)

    def _views(self, raw):
        out, offset = [], 0
        for size in self._sizes:
            out.append(raw[offset:offset + size])
            offset += size
        return out

    def prepare(self, block_tables: np.ndarray, context_lens: np.ndarray, num_rows: int):
        """Decide for the step's ``num_rows`` real rows (host arrays, at least that many rows); when cascade pays,
        enqueue the plan's upload on the current stream (before the step's inputs). Returns the variant:
        :data:`CASCADE` or None (plain decode)."""
        if not self.enabled or num_rows < 2:
            return None
        plan = self.rule.plan(block_tables[:num_rows], context_lens[:num_rows], self.block_size)
        if plan is None:
            return None
        plan = _largest(plan, self.max_groups)
        self._upload(plan, num_rows)
        self.num_cascade_steps += 1
        return CASCADE

    def _upload(self, plan: cascade.CascadePlan, num_rows: int) -> None:
        self._turn = (self._turn + 1) % len(self._hosts)
        host = self._hosts[self._turn]
        if self.on_gpu and self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()
        starts, plens, rows, suffix = self._views(host)
        g, used = plan.num_groups, len(plan.group_rows)
        starts[:g + 1], starts[g + 1:] = plan.group_starts, used
        plens[:g], plens[g:] = plan.prefix_lens, 0
        rows[:used], rows[used:] = plan.group_rows, 0
        suffix[:num_rows], suffix[num_rows:] = plan.suffix_starts, 0
        if self.on_gpu:
            stream = self.xp.cuda.get_current_stream()
            self.xp.cuda.runtime.memcpyAsync(self._device.data.ptr, host.ctypes.data, host.nbytes, 1, stream.ptr)
            event = self.xp.cuda.Event(block=False, disable_timing=True)
            event.record(stream)
            self._copied[self._turn] = event

    def attention(self, q, k_cache, v_cache, block_tables, context_lens, *, scale, check=False):
        """Decode attention of ``q`` [rows, heads, dim] with the uploaded plan (any ``rows <= max_rows``)."""
        rows = q.shape[0]
        groups = max(1, min(self.max_groups, rows // 2))
        return cascade.cascade_attention(q, k_cache, v_cache, block_tables, context_lens,
                                         self.group_starts[:groups + 1], self.group_rows[:rows],
                                         self.prefix_lens[:groups], self.suffix_starts[:rows], scale=scale)


def _largest(plan: cascade.CascadePlan, max_groups: int) -> cascade.CascadePlan:
    """The plan with at most ``max_groups`` groups: those saving the most key reads."""
    if plan.num_groups <= max_groups:
        return plan
    sizes = np.diff(plan.group_starts)
    keep = np.sort(np.argsort(-(sizes - 1) * plan.prefix_lens, kind="stable")[:max_groups])
    groups = [(plan.group_rows[plan.group_starts[g]:plan.group_starts[g + 1]], int(plan.prefix_lens[g])) for g in keep]
    return cascade.CascadePlan.from_groups(groups, plan.num_rows)
