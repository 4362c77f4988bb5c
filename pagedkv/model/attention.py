"""THE attention backend: a forward's attention metadata, built once, and the one call every layer makes.

::

    model.prefill(PrefillBatch) / model.decode(DecodeBatch)
        meta = attention.plan_prefill(batch, kv_cache) | attention.plan_rows(batch, kv_cache)   (once a forward)
        per layer:   attn = attention(layer, q, k, v, meta)      write this layer's K/V at meta.slot_mapping,
                                                                 then attend along meta.path

The path is chosen here, never by the model (FlashInfer's plan / run split; vLLM's metadata builder + forward)::

    decode      ops.paged_attention: a table and a context length per query row    DecodeBatch, no query_start_loc
                (version 4, tensor cores, where decode.choose_version says it pays:  (variant TENSOR_CORES)
                the step's host lengths are balanced enough for its grid)
    cascade     decode rows whose tables share leading blocks: each group's shared  DecodeBatch whose variant is
                prefix read once, each row's suffix, merged (pagedkv.cascade)       CASCADE (prepare_decode)
    prefill     ops.prefill_attention: a table and a context length per sequence,  GPU default for PrefillBatch;
                query_start_loc splitting the rows among sequences                  DecodeBatch with query_start_loc
    reference   float64 dense attention over each sequence's gathered cache        CPU default (paged_prefill None)
    dense       float32 products over padded groups, or per sequence over its      paged_prefill=False
                gathered context when it has cached tokens

Shapes: ``q [T, num_qo_heads, head_dim]``, ``k, v [T, num_kv_heads, head_dim]`` (this rank's heads), the
result like ``q``. Device metadata (decode, prefill) has launch shapes that depend on array shapes only, so a
model runner replays the forward in CUDA graphs from static buffers.

Where the next features plug in (each touches this module, the kernels and the config; not ``llama.py``, not
the runner):

- **fp8 KV cache** (built): the pool's dtype differs from q's. :meth:`_write` quantizes K/V into the pool and
  :meth:`_attend` passes the kv dtype and this layer's scales to the kernels, both from
  ``kv_cache.attention_args(layer)`` (``{}`` for a pool in the model's dtype); the host paths read the
  dequantized bytes (``kv_cache.gather``), never the unquantized ``k, v`` (dense: no varlen shortcut);
  :class:`AttentionMetadata` needs nothing new.
- **cascade attention** (issue 17, built): :meth:`prepare_decode` sees a decode step's host block tables before
  the runner uploads them and decides whether shared prefixes (the same first blocks in many rows) are read once
  per group; its plan lives in the static buffers of :mod:`pagedkv.model.cascade_backend`, :meth:`plan_rows`
  takes the ``cascade`` path for that variant, and :meth:`_attend` runs the prefix, suffix and merge kernels.
- **tensor parallelism**: a backend is built from the rank's local config (its ``num_heads`` /
  ``num_kv_heads``); q, k, v and the pool hold the rank's heads only, so nothing here changes.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernels import ops
from ..kernels.reference import dense_attention
from .layers import causal_attention, varlen_causal_attention, varlen_plan

PATHS = ("decode", "prefill", "reference", "dense", "cascade")
TENSOR_CORES = "tensor_cores"  # the decode variant of a step that version 4 runs (None: the default dispatcher)


@dataclass(slots=True)
class AttentionMetadata:
    """One forward's attention metadata (built once, read by every layer).

    ``slot_mapping`` [T] int64 on the device: where each row's K/V is written. Device paths: ``block_tables``
    int32 ``[rows, max_blocks]`` (decode) or ``[S, max_blocks]`` (prefill), ``context_lens`` likewise (new
    tokens included), ``query_start_loc`` [S + 1] int32 (prefill). Host paths (reference, dense):
    ``block_tables`` a list of each sequence's block ids, ``starts`` int64 [S + 1] row offsets, ``num_cached``
    and ``seq_lens`` per sequence, ``varlen`` a padded-group plan (dense, no cached tokens) or None.
    ``decode_version``: the decode kernel (None: the default dispatcher; 4: tensor cores).
    """

    path: str
    kv_cache: Any
    slot_mapping: Any
    block_tables: Any = None
    context_lens: Any = None
    query_start_loc: Any = None
    starts: Any = None
    num_cached: Any = None
    seq_lens: Any = None
    varlen: Any = None
    decode_version: Any = None

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"attention path must be one of {PATHS}, got {self.path!r}")


class AttentionBackend:
    """Plans a forward's attention and runs it, layer by layer.

    Args:
        num_qo_heads, num_kv_heads, head_dim: this rank's attention shape.
        xp: the array module; is_gpu: where it runs.
        paged_prefill: prefill rows through the paged prefill op (None: on a GPU only; the CPU then takes the
            float64 reference path), False: the dense path.
        check: validate index ranges in the ops (off on a GPU: the engine's metadata is trusted, and a check
            syncs the device).
    """

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, xp, *, is_gpu: bool,
                 paged_prefill: bool | None = None, check: bool = True):
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.xp, self.is_gpu, self.paged_prefill, self.check = xp, is_gpu, paged_prefill, check
        self.cascade = None  # CascadeBackend: the cascade decision and its static metadata (setup_decode)
        self._tc_types = None  # (dt, ct) when decode steps may run version 4 (setup_decode)
        self.num_tensor_core_steps = 0  # decode steps prepare_decode gave to version 4

    # -------------------------------------------------------------------------------------- decode variants
    def setup_decode(self, max_rows: int, block_size: int, *, cascade: bool, kv_cache=None,
                     tensor_cores: bool = True) -> tuple:
        """Decode variants beside plain decode that a model runner keeps CUDA graphs for: CASCADE when cascade
        attention is on for this model (16-bit GPU kernels for its head_dim, or the host reference), and
        :data:`TENSOR_CORES` on a GPU whose ``kv_cache`` version 4 reads (decode_tc.check_args: float16 /
        bfloat16 model, its cache or fp8, head_dim 64 / 128, 2-8 query heads per KV head; ``tensor_cores``
        False: never). Allocates the cascade metadata's static buffers (``max_rows`` decode rows)."""
        from .cascade_backend import CASCADE, CascadeBackend

        self.cascade = CascadeBackend(self.xp, max_rows, block_size, head_dim=self.head_dim, enabled=cascade)
        self._tc_types = self._tensor_core_types(kv_cache) if tensor_cores and self.is_gpu else None
        self._block_size = block_size
        return tuple(v for v, on in ((CASCADE, self.cascade.enabled), (TENSOR_CORES, self._tc_types is not None)) if on)

    def _tensor_core_types(self, kv_cache):
        """``(dt, ct)`` of version 4 for this model and cache, or None where it does not serve them."""
        from ..kernels import decode, decode_tc

        if kv_cache is None or self.num_qo_heads // self.num_kv_heads < 2:
            return None  # NOTE: the rule never picks version 4 for MHA (decode_tc.tc_decode_pays): no graphs for it
        try:
            dt, ct = decode.cache_types(kv_cache.dtype, kv_cache.cache_dtype, kv_cache.kv_dtype)
        except ValueError:
            return None
        ok = decode_tc.runs_on(dt, ct, self.head_dim, self.num_qo_heads, self.num_kv_heads, self.xp.cuda.Device().id)
        return (dt, ct) if ok else None

    def prepare_decode(self, block_tables, context_lens, num_rows: int, launch_rows: int | None = None):
        """A decode step's variant from its host rows (``block_tables`` [>= num_rows, max_blocks], ``context_lens``
        [>= num_rows]) launched as ``launch_rows`` rows (the graph's bucket; default ``num_rows``): CASCADE when
        the rule says a shared prefix pays (its plan uploaded on the current stream, before the step's inputs),
        else :data:`TENSOR_CORES` where :func:`pagedkv.kernels.decode.choose_version` picks version 4, else
        None."""
        variant = None if self.cascade is None else self.cascade.prepare(block_tables, context_lens, num_rows)
        if variant is None and self._tc_types is not None and num_rows > 0:
            from ..kernels import decode

            dt, ct = self._tc_types
            rows = num_rows if launch_rows is None else launch_rows
            cache_shape = (0, self.num_kv_heads, self._block_size, self.head_dim)
            if decode.choose_version((rows, self.num_qo_heads, self.head_dim), cache_shape, block_tables.shape[1],
                                     dt, ct, context_lens[:num_rows]) == 4:
                variant = TENSOR_CORES
                self.num_tensor_core_steps += 1
        return variant

    # ------------------------------------------------------------------------------------------ plan
    def plan_rows(self, batch, kv_cache) -> AttentionMetadata:
        """Metadata of a ``DecodeBatch`` (device arrays, as the model runner fills them): the decode path, or
        the prefill path when the batch carries ``query_start_loc``."""
        path = "decode" if batch.query_start_loc is None else "prefill"
        version = None
        if path == "decode" and batch.attention_variant == TENSOR_CORES:
            version = 4
        elif path == "decode" and batch.attention_variant is not None:
            path = "cascade"  # the other variant (setup_decode)
        return AttentionMetadata(path, kv_cache, batch.slot_mapping, batch.block_tables, batch.context_lens,
                                 batch.query_start_loc, decode_version=version)

    def plan_prefill(self, batch, kv_cache) -> AttentionMetadata:
        """Metadata of a ``PrefillBatch`` (host lists): the prefill, reference or dense path."""
        xp = self.xp
        slots = xp.asarray(np.asarray(batch.slot_mapping, dtype=np.int64))
        starts = np.concatenate([[0], np.cumsum(batch.seq_lens)]).astype(np.int64)
        if self.paged_prefill or (self.paged_prefill is None and self.is_gpu):
            width = max(len(t) for t in batch.block_tables)
            tables = np.zeros((len(batch.block_tables), width), dtype=np.int32)
            for row, table in zip(tables, batch.block_tables):
                row[: len(table)] = table
            lens = (np.asarray(batch.num_cached) + np.asarray(batch.seq_lens)).astype(np.int32)
            return AttentionMetadata("prefill", kv_cache, slots, xp.asarray(tables), xp.asarray(lens),
                                     xp.asarray(starts.astype(np.int32)))
        path = "reference" if self.paged_prefill is None else "dense"
        varlen = None
        if path == "dense" and not any(batch.num_cached) and not _is_fp8(kv_cache):
            varlen = varlen_plan(batch.seq_lens, self.num_qo_heads, self.num_kv_heads, xp)
        return AttentionMetadata(path, kv_cache, slots, batch.block_tables, starts=starts,
                                 num_cached=batch.num_cached, seq_lens=batch.seq_lens, varlen=varlen)

    # ------------------------------------------------------------------------------------------- run
    def __call__(self, layer: int, q, k, v, meta: AttentionMetadata):
        """Write this layer's ``k, v`` at ``meta.slot_mapping``, then attend ``q`` along ``meta.path``."""
        self._write(layer, k, v, meta)
        return self._attend(layer, q, k, v, meta)

    def _write(self, layer: int, k, v, meta: AttentionMetadata) -> None:
        c = meta.kv_cache
        ops.write_kv(k, v, c.k_cache(layer), c.v_cache(layer), meta.slot_mapping, check=self.check,
                     **_fp8_args(c, layer))

    def _attend(self, layer: int, q, k, v, meta: AttentionMetadata):
        c = meta.kv_cache
        if meta.path == "decode" or meta.path == "cascade" and c.k_cache(layer).dtype != q.dtype:
            # NOTE: the cascade kernels read caches of q's dtype only (no fp8): such a step decodes plainly
            return ops.paged_attention(q, c.k_cache(layer), c.v_cache(layer), meta.block_tables, meta.context_lens,
                                       scale=self.scale, check=self.check, version=meta.decode_version,
                                       split="length" if meta.decode_version == 4 else None, **_fp8_args(c, layer))
        if meta.path == "cascade":
            return self.cascade.attention(q, c.k_cache(layer), c.v_cache(layer), meta.block_tables, meta.context_lens,
                                          scale=self.scale)
        if meta.path == "prefill":
            return ops.prefill_attention(q, c.k_cache(layer), c.v_cache(layer), meta.block_tables,
                                         meta.query_start_loc, meta.context_lens, scale=self.scale, check=self.check,
                                         **_fp8_args(c, layer))
        if meta.path == "reference":
            return self._reference(layer, q, meta)
        return self._dense(layer, q, k, v, meta)

    def _reference(self, layer: int, q, meta: AttentionMetadata):
        """Float64 attention of each sequence's new tokens over its whole cached context (the CPU default).

        NOTE: the same float64 arithmetic as the CPU decode path, so a token's logits do not depend on whether
        it was computed in a whole prompt, a chunk, a decode row or a mixed step (greedy outputs agree).
        """
        out = np.empty_like(q)
        for i, (a, b) in enumerate(itertools.pairwise(meta.starts)):
            ctx = meta.num_cached[i] + meta.seq_lens[i]
            kc, vc = meta.kv_cache.gather(layer, meta.block_tables[i], ctx)
            out[a:b] = dense_attention(q[a:b], kc, vc, scale=self.scale, causal=True)
        return out

    def _dense(self, layer: int, q, k, v, meta: AttentionMetadata):
        """Causal attention with dense matrix products: padded groups of sequences, or per sequence over its
        gathered context when it has cached tokens (the reference for the paged op)."""
        if meta.varlen is not None:
            return varlen_causal_attention(q, k, v, meta.varlen, self.scale)
        out = self.xp.empty_like(q)
        fp8 = _is_fp8(meta.kv_cache)  # NOTE: an fp8 cache is read back (the stored values), never k / v
        for i, (a, b) in enumerate(itertools.pairwise(meta.starts)):
            if meta.num_cached[i] or fp8:
                ctx = meta.num_cached[i] + meta.seq_lens[i]
                kc, vc = meta.kv_cache.gather(layer, meta.block_tables[i], ctx)
                kc, vc = kc.astype(q.dtype, copy=False), vc.astype(q.dtype, copy=False)
            else:
                kc, vc = k[a:b], v[a:b]
            out[a:b] = causal_attention(q[a:b], kc, vc, self.scale)
        return out


def _is_fp8(kv_cache) -> bool:
    return bool(getattr(kv_cache, "is_fp8", False))


def _fp8_args(kv_cache, layer: int) -> dict:
    """``kv_dtype``, ``k_scale``, ``v_scale`` of an fp8 pool's layer for the ops; ``{}`` otherwise (and for
    pools without the method: a tensor-parallel rank's)."""
    args = getattr(kv_cache, "attention_args", None)
    return args(layer) if args is not None else {}
