"""Launch arithmetic of the paged decode kernels, in plain Python (no GPU needed, so CI tests it).

Mirrors of ``kernels_cu/paged_attention.cu``: the tile shape (``TileShape``), the shared memory of kernels
2 and 3 (``TileSmem``), kernel 2's capacity split-K plan, and kernel 3's batch-balanced plan, which the
kernel computes on the device from ``context_lens``; :func:`balanced_plan` computes the same pieces on the
host, for tests and for the benchmark's report; :func:`dispatch` mirrors the default's choice between that
walk and the partition plan. Element type codes: 0 float32, 1 float16, 2 bfloat16; cache codes add
3 fp8 e4m3 and 4 fp8 e5m2 (uint8 caches under float16/bfloat16 queries).

Kernel 3's plan (the picture is in the ``.cu`` header)::

    units    = tiles of (head group, sequence) items, head group-major: hg 0 [seq 0 | seq 1 | ...] hg 1 [...]
    per_block = max(ceil(units / num_blocks), min_tiles)         block b owns units [b, b + 1) * per_block
    piece    = one item's units inside one block; a sequence split over blocks b .. b + n - 1 leaves its
               pieces in slots 2b + 1, 2(b + 1), ..., 2(b + n - 1), counted in counters[b]; the piece
               that finishes last merges them
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

V2_THREADS = 128  # PAGEDKV_V2_THREADS (kernels 2 and 3)
V2_TILE_BYTES = 4096  # defaults of PAGEDKV_V2_TILE_BYTES / PAGEDKV_V2_STAGES
V2_STAGES = 4
MIN_PARTITION_TOKENS = 256  # kernel 2: split-K never cuts a context into pieces shorter than this
WAVE_EFFICIENCY = 0.95  # kernel 2: the fewest partitions whose grid fills this share of its last wave
V3_MIN_PIECE_TOKENS = 64  # kernel 3: a block is given at least this many tokens' worth of tiles
MIN_PART_TOKENS = 256  # PAGEDKV_MIN_PART_TOKENS: the partition plan never cuts pieces shorter than this
ELEMENT_BYTES = {0: 4, 1: 2, 2: 2, 3: 1, 4: 1}  # per cache type code


def tile_shape(ct: int, head_dim: int, tile_bytes: int = V2_TILE_BYTES) -> dict:
    """``TileShape`` of cache type ``ct``: math vectors per row (8 elements, 4 for float32), lanes per row (a
    power of two >= vpr, <= 32), row groups, tokens and 16-byte copies per tile (rows per thread =
    round(tile_bytes / row-group bytes), at least 1)."""
    eb = ELEMENT_BYTES[ct]
    vec = 4 if ct == 0 else 8
    vpr = head_dim // vec
    lpr = 32 if vpr > 16 else 16 if vpr > 8 else 8 if vpr > 4 else 4 if vpr > 2 else 2
    row_groups = V2_THREADS // lpr
    group_bytes = head_dim * eb * row_groups
    rows = max(1, (tile_bytes + group_bytes // 2) // group_bytes)
    tokens = rows * row_groups
    return {"vpr": vpr, "lpr": lpr, "row_groups": row_groups, "tile_tokens": tokens,
            "tile_vecs": tokens * head_dim * eb // 16}


def smem_parts(dt, head_dim, gt, tile_bytes, stages) -> dict:
    """The parts of a kernel-2/3 block's shared memory, in bytes: pipeline, reduction, small arrays, q, meta."""
    s = tile_shape(dt, head_dim, tile_bytes)  # dt: the cache type (q vectors per row = s["vpr"] for valid pairs)
    return {"pipe": 2 * stages * s["tile_vecs"] * 16, "red": max(s["row_groups"] * gt * head_dim * 4, V2_THREADS * 16),
            "small": 4 * (gt * s["tile_tokens"] + V2_THREADS + 3 * gt), "q": stages * gt * s["vpr"] * 16,
            "meta": 2 * stages * 16 * 4}


def v2_smem_bytes(dt: int, head_dim: int, gt: int, tile_bytes=V2_TILE_BYTES, stages=V2_STAGES) -> int:
    """Dynamic shared memory of one kernel-2 block: the pipeline, reused for the final reduction."""
    p = smem_parts(dt, head_dim, gt, tile_bytes, stages)
    return max(p["pipe"], p["red"]) + p["small"]


def v3_smem_bytes(dt: int, head_dim: int, gt: int, tile_bytes=V2_TILE_BYTES, stages=V2_STAGES) -> int:
    """Dynamic shared memory of one kernel-3 block: pipeline, q stages, reduction, scores, descriptors."""
    p = smem_parts(dt, head_dim, gt, tile_bytes, stages)
    return p["pipe"] + p["q"] + p["red"] + p["small"] + p["meta"]


def group_tile(group_size: int) -> int:
    """GT: query heads served per thread block (a power of two, at most 8)."""
    return min(8, 1 << (group_size - 1).bit_length())


def choose_num_partitions(batch: int, blocks_per_seq: int, max_context: int, tile_tokens: int,
                          resident_ctas: int) -> tuple[int, int]:
    """Kernel 2's split-K: ``(num_partitions, partition_tokens)``.

    Decode attention is one pass over memory, so the grid should fill the GPU in whole waves: take the
    fewest partitions whose grid (``batch * blocks_per_seq * partitions`` thread blocks) fills at least
    ``WAVE_EFFICIENCY`` of ``ceil(grid / resident_ctas)`` waves, never cutting pieces shorter than
    ``MIN_PARTITION_TOKENS``. ``resident_ctas`` = SMs x blocks per SM (from registers and shared memory);
    ``max_context`` is the table's capacity (max_blocks * block_size), known without a device read.
    """
    units = batch * blocks_per_seq
    best = None
    for parts in range(1, max(1, max_context // MIN_PARTITION_TOKENS) + 1):
        partition_tokens = -(-(-(-max_context // parts)) // tile_tokens) * tile_tokens
        parts = -(-max_context // partition_tokens)
        grid = units * parts
        efficiency = grid / (resident_ctas * -(-grid // resident_ctas))
        if best is None or efficiency > best[0] + 1e-9:
            best = (efficiency, parts, partition_tokens)
        if efficiency >= WAVE_EFFICIENCY:
            break
    return best[1], best[2]


def v3_min_tiles(tile_tokens: int) -> int:
    return max(1, -(-V3_MIN_PIECE_TOKENS // tile_tokens))


def partition_max_parts(items0: int, grid: int, capacity: int) -> int:
    """The most partitions the default's partition plan may cut a sequence into (sizes its partials:
    ``items0 * max_parts`` slots, ``items0`` = batch * head groups): enough to fill 16 waves of ``grid``
    thread blocks, never pieces under ``MIN_PART_TOKENS`` of the table's capacity, at most 128."""
    return max(1, min(128, capacity // MIN_PART_TOKENS, -(-16 * grid // max(items0, 1))))


def _partition_key(items0: int, parts: int, max_len: int, tile_tokens: int, grid: int) -> int:
    pt = -(-(-(-max_len // parts)) // tile_tokens) * tile_tokens
    np_ = -(-max_len // pt)
    items = items0 * np_
    waves = -(-items // grid)
    if 20 * items >= 19 * grid * waves:
        return (1 << 30) + (1023 - np_)
    return (items * 65536 // (grid * waves)) * 1024 + (1023 - np_)


def dispatch(context_lens, num_head_groups: int, tile_tokens: int, grid: int, max_parts: int,
             mode: int = 0) -> tuple[int, int, int]:
    """The default decode kernel's choice, as every thread block of kernel 3 makes it on the device:
    ``(mode, parts, part_tokens)``, mode 2 = the partition plan (kernel 2's tile loop over items of
    ``part_tokens`` tokens from an atomic queue), 3 = the balanced walk.

    Partitions: the fewest whose ``batch * num_head_groups * parts`` items fill >= 95 % of their last wave of
    ``grid`` blocks (else the fullest), pieces of whole tiles and >= ``MIN_PART_TOKENS``. Mode 0 picks the
    partition plan when the lengths are within 1/8 of the longest, or when its longest piece is at most a
    fifth of a block's share of the tiles (the queue balances then); else the walk.
    """
    lens = np.asarray(context_lens, dtype=np.int64)
    max_len, min_len = int(lens.max()), int(lens.min())
    tiles = np.where(lens > 0, -(-lens // tile_tokens), 0)
    work = num_head_groups * int(tiles.sum())
    items0 = num_head_groups * len(lens)
    pmax = max(1, min(max_parts, V2_THREADS, max_len // MIN_PART_TOKENS))
    key = max(_partition_key(items0, p, max_len, tile_tokens, grid) for p in range(1, pmax + 1))
    parts = 1023 - (key & 1023)
    part_tokens = -(-(-(-max_len // parts)) // tile_tokens) * tile_tokens
    if mode == 0:
        near_uniform = (max_len - min_len) * 8 <= max_len
        longest = -(-min(max_len, part_tokens) // tile_tokens)
        mode = 2 if near_uniform or 5 * longest * grid <= work else 3
    return mode, parts, part_tokens


@dataclass(slots=True, frozen=True)
class Piece:
    """One item's tiles inside one block: tokens ``[first_tile, first_tile + num_tiles) * tile_tokens``
    of sequence ``seq`` for head group ``head_group``; ``slot`` is None when the piece is the whole
    sequence (written to ``out`` directly), else its partial's slot."""
    block: int
    head_group: int
    seq: int
    first_tile: int
    num_tiles: int
    slot: int | None


@dataclass(slots=True, frozen=True)
class Merge:
    """A sequence split over blocks ``block .. block + num_pieces - 1`` (counted in ``counters[block]``)."""
    block: int
    head_group: int
    seq: int
    num_pieces: int


@dataclass(slots=True, frozen=True)
class BalancedPlan:
    per_block: int  # units (tiles) per block
    pieces: tuple[Piece, ...]
    merges: tuple[Merge, ...]


def balanced_plan(context_lens, num_head_groups: int, tile_tokens: int, num_blocks: int,
                  min_tiles: int) -> BalancedPlan:
    """Kernel 3's plan, worked out on the host exactly as every thread block works it out on the device.

    Args:
        context_lens: [batch] ints (lengths <= 0 are empty items, never written).
        num_head_groups: num_kv_heads * ceil(group_size / GT).
        tile_tokens: tokens per tile (:func:`tile_shape`).
        num_blocks: the kernel's grid; min_tiles: the fewest units a block is given.
    """
    lens = np.asarray(context_lens, dtype=np.int64)
    tiles = np.where(lens > 0, -(-lens // tile_tokens), 0)
    total = int(tiles.sum())
    units = num_head_groups * total
    per_block = max(-(-units // num_blocks), max(min_tiles, 1)) if units else max(min_tiles, 1)
    starts = np.concatenate([[0], np.cumsum(tiles)])
    pieces, merges = [], []
    for hg in range(num_head_groups):
        for seq in np.flatnonzero(tiles).tolist():
            first, last = hg * total + int(starts[seq]), hg * total + int(starts[seq + 1]) - 1
            b0, b1 = first // per_block, last // per_block
            for b in range(b0, b1 + 1):
                lo, hi = max(first, b * per_block), min(last, (b + 1) * per_block - 1)
                slot = None if b0 == b1 else 2 * b + (1 if b == b0 else 0)
                pieces.append(Piece(b, hg, seq, lo - first, hi - lo + 1, slot))
            if b1 > b0:
                merges.append(Merge(b0, hg, seq, b1 - b0 + 1))
    return BalancedPlan(per_block, tuple(pieces), tuple(merges))
