"""The Llama-architecture decoder on a paged KV cache: batched prefill and batched decode.

One layer, for ``T`` tokens (prefill: the new tokens of several sequences concatenated; decode: one per
sequence)::

    h = rms_norm(x)
    q|k|v = h @ wqkv (+ bqkv)  ─► RoPE(q, k) at positions
    attn = attention(l, q, k, v, meta)                    # writes k, v into the paged pool, then attends
    x = x + attn @ wo
    x = x + silu(h2 @ w_gate) * (h2 @ w_up) @ w_down       # h2 = rms_norm(x), gate|up fused

``meta`` is built once a forward by :mod:`pagedkv.model.attention` (the attention backend), which alone
chooses the path (decode, prefill, reference, dense) and owns the attention metadata.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import Backend
from .attention import AttentionBackend
from .config import ModelConfig
from .host_matmul import float64_matmul, make_host_matmul
from .layers import Rope, rms_norm, silu_mul
from .weights import ModelWeights


@dataclass(slots=True)
class PrefillBatch:
    """Host metadata of a batched prefill: the new tokens of each sequence, concatenated.

    ``num_cached[i]`` tokens of sequence ``i`` are already in the cache (a shared prefix, earlier chunks of a
    chunked prefill, or the whole context of a decode row); its ``seq_lens[i]`` new tokens sit at positions
    ``num_cached[i] ..`` and are written to ``slot_mapping``. ``logit_rows`` picks the token rows whose logits
    are returned (default: each sequence's last)::

        tokens        a0 a1 a2 | b5 | c8 c9        seq_lens [3, 1, 2]   num_cached [0, 5, 8]
        logit_rows    [2, 3, 5]  (default)
    """

    token_ids: np.ndarray  # [T] int
    positions: np.ndarray  # [T] int
    slot_mapping: np.ndarray  # [T] int64
    seq_lens: list[int]
    num_cached: list[int]
    block_tables: list[list[int]]
    logit_rows: np.ndarray | None = None  # [R] int64 rows of the batch, or None for each sequence's last

    def last_rows(self) -> np.ndarray:
        """int64 [S]: each sequence's last row."""
        return np.cumsum(np.asarray(self.seq_lens, dtype=np.int64)) - 1

    def rows(self) -> np.ndarray:
        return self.last_rows() if self.logit_rows is None else np.asarray(self.logit_rows, dtype=np.int64)

    def __post_init__(self):
        total = sum(self.seq_lens)
        if not len(self.token_ids) == len(self.positions) == len(self.slot_mapping) == total:
            raise ValueError(f"prefill batch: {len(self.token_ids)} tokens, {len(self.positions)} positions, "
                             f"{len(self.slot_mapping)} slots, seq_lens sum {total}")


@dataclass(slots=True)
class DecodeBatch:
    """Device metadata of a forward given as rows (one per query token), as the model runner builds it.

    Decode layout (``query_start_loc`` None): each row attends its own prefix through the paged decode
    kernel — a table and a context length per row. A decode step has one row per sequence; a prefill can be
    given this way too (one row per prompt token, the sequence's table repeated, ``context_lens =
    positions + 1``): the decode-rows path, kept as a test oracle of the prefill op.

    Prefill layout (``query_start_loc`` given): the rows are the new tokens of ``S`` sequences concatenated,
    attended by the paged prefill op — a table and a context length per *sequence*.
    ``logit_rows`` picks the rows whose logits are wanted (None: every row).
    """

    token_ids: object  # [B] int
    positions: object  # [B] int
    slot_mapping: object  # [B] int64
    block_tables: object  # [B, max_blocks] int32 (prefill layout: [S, max_blocks])
    context_lens: object  # [B] int32, the new token included (prefill layout: [S], the new tokens included)
    logit_rows: object = None  # [R] int64, or None for every row
    query_start_loc: object = None  # [S + 1] int32 (prefill layout): sequence i owns rows qsl[i]..qsl[i+1]-1
    # decode layout: the attention backend's variant of this step (its ``prepare_decode``; None: plain decode)
    attention_variant: object = None


class ElementwiseOps:
    """RMSNorm, q/k/v split + bias + RoPE, SwiGLU, written with plain array operations (any backend)."""

    def __init__(self, config: ModelConfig, rope: Rope):
        self.config, self.rope = config, rope

    def norm(self, x, weight):
        return rms_norm(x, weight, self.config.rms_norm_eps)

    def add_norm(self, x, y, weight):
        """``(x + y, norm(x + y))``: the residual add and the RMSNorm after it."""
        x = x + y
        return x, self.norm(x, weight)

    def qkv_rope(self, qkv, bias, positions):
        """Split ``qkv`` [T, qkv_size] into contiguous q [T, Hq, D], k, v [T, Hkv, D]; rotate q and k."""
        c = self.config
        if bias is not None:
            qkv = qkv + bias
        nq, nkv, d = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.head_dim
        q = self.rope(qkv[:, :nq].reshape(-1, c.num_heads, d), positions)
        k = self.rope(qkv[:, nq:nq + nkv].reshape(-1, c.num_kv_heads, d), positions)
        v = qkv[:, nq + nkv:].reshape(-1, c.num_kv_heads, d).copy()
        return q, k, v

    def act(self, gate_up):
        return silu_mul(gate_up)


class LlamaModel:
    """A decoder of the Llama architecture (Llama, Qwen2) whose attention reads the paged KV cache.

    Args:
        config: the model shapes; weights: on ``backend``, in one dtype.
        max_positions: rotary tables are built for positions ``[0, max_positions)``.
        fused: on a GPU, use fused elementwise kernels (``pagedkv.model.fused``) when they self-check.
        paged_prefill: prefill attention through the paged prefill op, one launch per layer for the whole batch
            (default on a GPU); False: dense float32 products over padded groups; None on the CPU: the float64
            reference over each sequence's cache, the same arithmetic for a decode row, a prefill chunk or a
            whole prompt.
        parallel, collective: one rank of a tensor-parallel model (:mod:`pagedkv.model.tensor_parallel`):
            ``config`` and ``weights`` are the rank's slice; the output projection's and the MLP's partial sums
            are all-reduced, the vocab-parallel embedding too, and the logits all-gathered.

    On a GPU the matrix products go through :mod:`pagedkv.model.cublas` (capturable into CUDA graphs) when it
    loads and self-checks; ``gemm_error`` / ``fused_error`` say why a fallback was taken (None: none was).
    On the CPU they accumulate in float64 and round to the activations' dtype (``host_matmul="float64"``, the
    default) or run in float32 BLAS (``"float32"``): see :mod:`pagedkv.model.host_matmul`.
    """

    def __init__(self, config: ModelConfig, weights: ModelWeights, backend: Backend, *,
                 max_positions: int | None = None, fused: bool = True, paged_prefill: bool | None = None,
                 parallel=None, collective=None, host_matmul: str = "float64"):
        self.config, self.weights, self.backend, self.xp = config, weights, backend, backend.xp
        self.parallel, self.collective = parallel, collective
        self.dtype = np.dtype(weights.embed.dtype)
        self.rope = Rope(config.head_dim, config.rope_theta, max_positions or config.max_position_embeddings,
                         self.xp, config.rope_llama3_scaling)
        self.ops = ElementwiseOps(config, self.rope)
        self.fused_error = None
        if backend.is_gpu and fused:
            from .fused import make_fused_ops

            self.ops, self.fused_error = make_fused_ops(config, self.rope, self.dtype, self.ops)
        self.matmul, self.gemm_error = make_host_matmul(host_matmul), None
        if backend.is_gpu:
            from .cublas import make_gemm

            self.matmul, self.gemm_error = make_gemm(self.dtype)
        # NOTE: range checks sync the GPU; the engine's metadata is trusted there
        self.attention = AttentionBackend(config.num_heads, config.num_kv_heads, config.head_dim, self.xp,
                                          is_gpu=backend.is_gpu, paged_prefill=paged_prefill,
                                          check=not backend.is_gpu)
        self.scale = self.attention.scale

    # ----------------------------------------------------------------------------------------- prefill
    def prefill(self, batch: PrefillBatch, kv_cache):
        """Run the new tokens of each sequence, write their K/V, return logits of each last token [B, vocab]."""
        xp = self.xp
        positions = xp.asarray(np.asarray(batch.positions, dtype=np.int64))
        x = self._embed(xp.asarray(np.asarray(batch.token_ids, dtype=np.int64)))
        x = self._layers(x, positions, self.attention.plan_prefill(batch, kv_cache))
        return self._logits(x[xp.asarray(batch.rows())])

    # ------------------------------------------------------------------------------------------ decode
    def decode(self, batch: DecodeBatch, kv_cache):
        """The forward of rows (see :class:`DecodeBatch`); returns logits [B (or R), vocab] (model dtype)."""
        x = self._embed(batch.token_ids)
        x = self._layers(x, batch.positions, self.attention.plan_rows(batch, kv_cache))
        return self._logits(x if batch.logit_rows is None else x[batch.logit_rows])

    # ---------------------------------------------------------------------------------------- shared
    def _layers(self, x, positions, meta):
        """The decoder layers over rows ``x``, one attention call each (``meta``: the forward's attention
        metadata); each residual add is fused with the norm after it (the last layer's with nothing: the final
        norm runs on the logits rows only)."""
        c, layers = self.config, self.weights.layers
        h = self.ops.norm(x, layers[0].input_norm)
        for layer, lw in enumerate(layers):
            q, k, v = self.ops.qkv_rope(self.matmul(h, lw.wqkv), lw.bqkv, positions)
            attn = self.attention(layer, q, k, v, meta)
            out = self._reduce(self.matmul(attn.reshape(-1, c.num_heads * c.head_dim), lw.wo))
            x, h = self.ops.add_norm(x, out, lw.post_norm)
            mlp = self._reduce(self.matmul(self.ops.act(self.matmul(h, lw.w_gate_up)), lw.w_down))
            if layer + 1 == len(layers):
                return x + mlp
            x, h = self.ops.add_norm(x, mlp, layers[layer + 1].input_norm)
        return x

    def _logits(self, x):
        logits = self.matmul(self.ops.norm(x, self.weights.final_norm), self.weights.lm_head)
        if self.parallel is None:
            return logits
        return self.collective.all_gather(logits)[:, :self.parallel.config.vocab_size]  # the padding cut off

    def _embed(self, token_ids):
        """Embedding rows of ``token_ids``; vocab-parallel: this rank's rows, zeros elsewhere, summed by all ranks."""
        if self.parallel is None:
            return self.weights.embed[token_ids]
        xp, per = self.xp, self.parallel.vocab_per_rank
        local = token_ids - self.parallel.rank * per
        inside = (local >= 0) & (local < per)
        x = self.weights.embed[xp.where(inside, local, 0)] * inside[:, None].astype(self.dtype)
        return self.collective.all_reduce(x)

    def _reduce(self, x):
        """A row-parallel product's partial sums, summed over the ranks (the identity on one rank)."""
        return x if self.parallel is None else self.collective.all_reduce(x)


def host_matmul(x, w):
    """``x @ w`` on the host, accumulated in float64 and rounded to ``x``'s dtype (:func:`float64_matmul`)."""
    return float64_matmul(x, w)
