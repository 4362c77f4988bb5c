"""Tensor parallelism (Megatron-style) of the Llama decoder: how a model is cut over ``tp_size`` ranks, and
the collectives each rank's forward calls.

Per layer, every rank holds a slice and the ranks meet twice (``x @ w`` with ``w`` stored ``[in, out]``)::

    rank r of N        q|k|v = h @ wqkv[:, heads of r]          column-parallel: local q heads, local KV heads
                       attn  = attention(q, k, v)                (the rank's KV pool holds only its KV heads)
                       o_r   = attn @ wo[rows of r, :]           row-parallel: a partial sum of the output
    all-reduce         o     = sum_r o_r                         (1st meeting)
                       g|u   = h2 @ w_gate_up[:, columns of r]   column-parallel: intermediate / N columns
                       d_r   = act(g|u) @ w_down[rows of r, :]   row-parallel
    all-reduce         d     = sum_r d_r                         (2nd meeting)

The embedding and the LM head are vocab-parallel: rank r holds the rows (columns) of token ids
``[r * P, (r + 1) * P)``, ``P = ceil(V / N)``, zero-padded past ``V`` so every rank's slice has one shape (as an
all-gather wants); an id outside its rows embeds to zeros and an all-reduce sums the ranks' rows; each rank's
logits cover its P ids, an all-gather concatenates them and the padding is cut off for sampling.

KV heads: with ``num_kv_heads >= N`` each rank holds ``num_kv_heads / N`` of them; with fewer (MQA, or 8 KV
heads over 16 ranks) each rank holds one, the KV head its query heads read, replicated on ``N /
num_kv_heads`` ranks. The block tables are the same on every rank: only the head axis of the pools is split.

:class:`ThreadWorld` is the simulated world: N ranks as threads of one process whose collectives are sums (in
rank order, so every rank gets the same bits); it checks the sharding math on the CPU against the unsharded
model. On GPUs the collectives are NCCL's.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import numpy as np

from .config import ModelConfig
from .weights import LayerWeights, ModelWeights


def _check_size(config: ModelConfig, tp_size: int) -> None:
    """ValueError unless ``config`` splits evenly over ``tp_size`` ranks (query heads, KV heads, MLP)."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive int, got {tp_size!r}")
    c = config
    if c.num_heads % tp_size:
        raise ValueError(f"tensor_parallel_size={tp_size} does not divide num_heads={c.num_heads}")
    kv = c.num_kv_heads
    if (kv >= tp_size and kv % tp_size) or (kv < tp_size and tp_size % kv):
        raise ValueError(f"tensor_parallel_size={tp_size} and num_kv_heads={kv}: one must divide the other")
    if c.intermediate_size % tp_size:
        raise ValueError(f"tensor_parallel_size={tp_size} does not divide intermediate_size={c.intermediate_size}")


@dataclass(frozen=True, slots=True)
class TensorParallelPlan:
    """Which slice of a model rank ``rank`` of ``tp_size`` holds. Raises ValueError for a split that does not
    divide the model's heads or MLP."""

    config: ModelConfig
    tp_size: int
    rank: int

    def __post_init__(self):
        _check_size(self.config, self.tp_size)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.tp_size:
            raise ValueError(f"rank must be an int in [0, {self.tp_size}), got {self.rank!r}")

    @property
    def num_heads(self) -> int:
        return self.config.num_heads // self.tp_size

    @property
    def num_kv_heads(self) -> int:
        return max(1, self.config.num_kv_heads // self.tp_size)

    def q_heads(self) -> range:
        return range(self.rank * self.num_heads, (self.rank + 1) * self.num_heads)

    def kv_heads(self) -> range:
        """The KV heads this rank's query heads read (one replicated head when there are fewer than ranks)."""
        group = self.config.num_heads // self.config.num_kv_heads
        first = self.q_heads().start // group
        return range(first, first + self.num_kv_heads)

    def mlp_columns(self) -> range:
        n = self.config.intermediate_size // self.tp_size
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.config.vocab_size // self.tp_size)

    def vocab_range(self) -> range:
        """The token ids whose embedding rows and logits this rank holds (the padding past V excluded)."""
        per, vocab = self.vocab_per_rank, self.config.vocab_size
        return range(min(self.rank * per, vocab), min((self.rank + 1) * per, vocab))

    def local_config(self) -> ModelConfig:
        """The shapes of this rank's model: its heads, its MLP columns, its (padded) vocab rows."""
        return replace(self.config, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                       intermediate_size=self.config.intermediate_size // self.tp_size,
                       vocab_size=self.vocab_per_rank)


def _head_columns(heads: range, head_dim: int, offset: int) -> np.ndarray:
    return offset + np.arange(heads.start * head_dim, heads.stop * head_dim)


def shard_weights(weights: ModelWeights, plan: TensorParallelPlan, xp=np) -> ModelWeights:
    """Rank ``plan.rank``'s slice of ``weights`` (contiguous copies, on ``xp``); norms are replicated.

    ``wqkv [hidden, (Hq + 2 Hkv) D]`` keeps the rank's q, k and v head columns (in that order); ``wo`` and
    ``w_down`` keep the matching rows; ``w_gate_up`` the rank's gate and up columns; ``embed`` its P vocab rows
    and ``lm_head`` its P vocab columns, zeros past V (a tied head stays a view of the embedding shard)."""
    c, d = plan.config, plan.config.head_dim
    nq, nkv = c.num_heads * d, c.num_kv_heads * d
    qkv_cols = np.concatenate([_head_columns(plan.q_heads(), d, 0), _head_columns(plan.kv_heads(), d, nq),
                               _head_columns(plan.kv_heads(), d, nq + nkv)])
    q_rows = _head_columns(plan.q_heads(), d, 0)
    cols = np.asarray(plan.mlp_columns())
    gate_up_cols = np.concatenate([cols, c.intermediate_size + cols])
    vocab = np.asarray(plan.vocab_range(), dtype=np.int64)

    def take(a, index, axis):
        return None if a is None else xp.ascontiguousarray(xp.take(xp.asarray(a), xp.asarray(index), axis=axis))

    layers = [LayerWeights(input_norm=xp.asarray(lw.input_norm), wqkv=take(lw.wqkv, qkv_cols, 1),
                           bqkv=take(lw.bqkv, qkv_cols, 0), wo=take(lw.wo, q_rows, 0),
                           post_norm=xp.asarray(lw.post_norm), w_gate_up=take(lw.w_gate_up, gate_up_cols, 1),
                           w_down=take(lw.w_down, cols, 0)) for lw in weights.layers]
    embed = _pad_rows(take(weights.embed, vocab, 0), plan.vocab_per_rank, xp)
    lm_head = embed.T if weights.tied else _pad_rows(take(weights.lm_head, vocab, 1).T, plan.vocab_per_rank, xp).T
    return ModelWeights(embed=embed, layers=layers, final_norm=xp.asarray(weights.final_norm), lm_head=lm_head,
                        tied=weights.tied)


def _pad_rows(a, rows: int, xp):
    """``a`` with zero rows appended up to ``rows`` (a contiguous copy)."""
    out = xp.zeros((rows,) + a.shape[1:], dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


class Collective:
    """The collectives one rank's forward calls. ``size`` ranks; this one is ``rank``.

    ``all_reduce(x)``: the element-wise sum of every rank's ``x`` (same shape), returned on every rank.
    ``all_gather(x)``: every rank's ``x`` (same shape) concatenated along the last axis, in rank order."""

    rank: int = 0
    size: int = 1

    def all_reduce(self, x):
        return x

    def all_gather(self, x):
        return x


class WorldBroken(RuntimeError):
    """A rank of the world failed (raised, or timed out at a collective): the others stop with this."""


class ThreadWorld:
    """``size`` ranks as threads of one process; collectives are sums in rank order (the CPU simulated world).

    Every rank must call the same collectives in the same order (as the forward does). A rank that raises
    breaks the world (:meth:`abort`): the others leave their next collective with :class:`WorldBroken` instead
    of waiting for ever; ``timeout`` bounds a wait at one collective."""

    def __init__(self, size: int, timeout: float = 120.0):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"world size must be a positive int, got {size!r}")
        self.size, self.timeout = size, timeout
        self._slots: list = [None] * size
        self._barrier = threading.Barrier(size, timeout=timeout)

    def group(self, rank: int) -> "_ThreadCollective":
        if not 0 <= rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}), got {rank}")
        return _ThreadCollective(self, rank)

    def abort(self) -> None:
        self._barrier.abort()

    def reset(self) -> None:
        """Make a broken world usable again (between forwards, once every rank has returned)."""
        self._barrier.reset()
        self._slots = [None] * self.size

    def _exchange(self, rank: int, x) -> list:
        try:
            self._slots[rank] = x
            self._barrier.wait()
            parts = list(self._slots)
            self._barrier.wait()  # NOTE: nobody overwrites a slot before every rank has read them all
            return parts
        except threading.BrokenBarrierError:
            raise WorldBroken("another rank failed or timed out at a collective") from None


class _ThreadCollective(Collective):
    def __init__(self, world: ThreadWorld, rank: int):
        self.world, self.rank, self.size = world, rank, world.size

    def all_reduce(self, x):
        parts = self.world._exchange(self.rank, x)
        total = parts[0].copy()
        for part in parts[1:]:
            total += part
        return total

    def all_gather(self, x):
        parts = self.world._exchange(self.rank, x)
        xp = np if isinstance(x, np.ndarray) else __import__("cupy")
        return xp.concatenate(parts, axis=-1)


def run_ranks(world: ThreadWorld, fn, ranks=None) -> list:
    """``fn(rank)`` on every rank, each in its own thread; the results in rank order. The first exception of
    a rank is raised here (after the world is aborted so that no rank waits for ever), the world then reset."""
    ranks = range(world.size) if ranks is None else ranks
    results: list = [None] * world.size
    errors: list = []

    def body(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            errors.append((rank, exc))
            world.abort()

    threads = [threading.Thread(target=body, args=(r,), name=f"tp-rank-{r}", daemon=True) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        world.reset()
        rank, exc = min(errors, key=lambda e: isinstance(e[1], WorldBroken))  # the root cause first
        raise exc
    return results


__all__ = ["Collective", "TensorParallelPlan", "ThreadWorld", "WorldBroken", "run_ranks", "shard_weights"]
