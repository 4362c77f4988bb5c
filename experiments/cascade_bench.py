"""cascade_bench: cascade decode attention (prefix + suffix + merge) against plain paged decode and the read
ceiling (``python -m experiments.cascade_bench``), and the measurements behind :class:`pagedkv.cascade.CascadeRule`.

Each case is one layer of a decode step: groups of rows sharing a prefix of whole blocks (the same physical
blocks at the head of each member's table, as the prefix cache and ``fork_sequence`` leave them) plus each row's
own suffix, float16, block size 16, shuffled pool. Per case: plain decode (``pagedkv.kernels`` default kernel,
which reads the prefix once per row), cascade (the three kernels; default prefix splits and a few others), each
cascade kernel alone, and the floor: K/V bytes with each prefix read once (prefix + suffixes) / the measured read
ceiling. Every launch follows an L2 flush (a 512 MB read), median of RUNS (kernel_bench's timer).

    python -m experiments.cascade_bench --output-json cascade_bench.json
"""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass

import numpy as np

from . import cli
from .kernel_bench import FLUSH_BYTES, Timer, ceilings, make_read_kernel

SEED = 0
RUNS = 30
BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class Case:
    """``num_groups`` groups of ``group_size`` rows sharing ``prefix`` tokens, each row with U[lo, hi] own tokens."""
    label: str
    num_groups: int
    group_size: int
    prefix: int
    suffix: tuple[int, int] = (16, 128)
    num_qo_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 64
    splits: tuple[int, ...] = ()  # extra prefix-split counts timed beside the default
    m_tiles: bool = False  # also time both prefix tile heights (16 and 32 rows per warp)


CASES = (
    Case("shared document 128 x (4000 + U[42, 170])", 1, 128, 4000, (42, 170), splits=(2, 4, 16), m_tiles=True),
    Case("shared document 256 x (4000 + U[42, 170])", 1, 256, 4000, (42, 170)),
    Case("shared document 128 x (4000 + U[42, 170]), hd 128", 1, 128, 4000, (42, 170), head_dim=128),
    Case("n = 16: 8 prompts x 16 branches x (2048 + U[1, 256])", 8, 16, 2048, (1, 256), splits=(2, 4), m_tiles=True),
    Case("n = 16: 1 prompt x 16 branches x (2048 + U[1, 256])", 1, 16, 2048, (1, 256), splits=(2, 8, 16)),
    # the rule's grid: one group holding every row
    *(Case(f"rule: {g} x ({p} + U[16, 128])", 1, g, p) for p in (256, 1024, 4096) for g in (2, 4, 8, 16, 32, 128)),
)


def build(cupy, rng, case: Case):
    """Device arrays of one layer: q, K/V pools (shared prefix blocks once per group), tables, lengths, plan."""
    from pagedkv.cascade import CascadePlan

    bs, rows = BLOCK_SIZE, case.num_groups * case.group_size
    prefix_blocks = case.prefix // bs
    own = rng.integers(case.suffix[0], case.suffix[1] + 1, rows)
    lens = (prefix_blocks * bs + own).astype(np.int32)
    own_blocks = -(-own // bs)
    num_blocks = case.num_groups * prefix_blocks + int(own_blocks.sum())
    perm = rng.permutation(num_blocks).astype(np.int32)
    tables = np.zeros((rows, prefix_blocks + int(own_blocks.max())), dtype=np.int32)
    nxt = case.num_groups * prefix_blocks
    for r in range(rows):
        g = r // case.group_size
        tables[r, :prefix_blocks] = perm[g * prefix_blocks:(g + 1) * prefix_blocks]
        tables[r, prefix_blocks:prefix_blocks + own_blocks[r]] = perm[nxt:nxt + own_blocks[r]]
        nxt += own_blocks[r]
    plan = CascadePlan.from_groups([(np.arange(g * case.group_size, (g + 1) * case.group_size), prefix_blocks * bs)
                                    for g in range(case.num_groups)], rows)
    shape = (num_blocks, case.num_kv_heads, bs, case.head_dim)
    k = cupy.random.standard_normal(shape, dtype=cupy.float32).astype(cupy.float16)
    v = cupy.random.standard_normal(shape, dtype=cupy.float32).astype(cupy.float16)
    q = cupy.random.standard_normal((rows, case.num_qo_heads, case.head_dim), dtype=cupy.float32).astype(cupy.float16)
    token_bytes = case.num_kv_heads * case.head_dim * 2 * 2
    dev = [cupy.asarray(a) for a in (tables, lens, plan.group_starts, plan.group_rows, plan.prefix_lens,
                                     plan.suffix_starts)]
    read_once = (case.num_groups * prefix_blocks * bs + int(own.sum())) * token_bytes
    return q, k, v, dev, read_once, int(lens.sum()) * token_bytes


def run_case(cupy, timer, rng, case: Case, ceiling_gbps: float) -> dict:
    from pagedkv.kernels import cascade as kc, decode

    q, k, v, (bt, cl, starts, rows, plens, sufs), read_once, read_plain = build(cupy, rng, case)
    scale = case.head_dim ** -0.5
    plain = decode.paged_attention(q, k, v, bt, cl, check=False)
    out = cupy.empty_like(q)
    run = lambda splits=None, m=None: kc.cascade_attention(q, k, v, bt, cl, starts, rows, plens, sufs,  # noqa
                                                           scale=scale, out=out, num_splits=splits, m_tiles=m)
    run()
    err = float(cupy.abs(out.astype(cupy.float32) - plain.astype(cupy.float32)).max())
    row = {"case": case.label, "rows": int(q.shape[0]), "groups": case.num_groups, "group_size": case.group_size,
           "prefix": case.prefix, "head_dim": case.head_dim, "heads": [case.num_qo_heads, case.num_kv_heads],
           "bytes_read_once": read_once, "bytes_plain": read_plain, "max_abs_diff_vs_plain": err,
           "floor_us": read_once / ceiling_gbps / 1e3,
           "default_splits": kc.choose_num_splits(q.shape[0], case.num_qo_heads // case.num_kv_heads,
                                                  case.num_kv_heads, case.head_dim, cupy.cuda.Device().id),
           "prefix_shape": kc.prefix_shape(q.shape[0], case.num_qo_heads // case.num_kv_heads, case.head_dim)}
    row["plain_us"] = timer.median_us(lambda: decode.paged_attention(q, k, v, bt, cl, out=plain, check=False),
                                      runs=RUNS)[0]
    row["cascade_us"] = timer.median_us(run, runs=RUNS)[0]
    for s in case.splits:
        row[f"cascade_s{s}_us"] = timer.median_us(lambda: run(s), runs=RUNS)[0]
    for m in (1, 2) if case.m_tiles else ():
        row[f"cascade_m{m}_us"] = timer.median_us(lambda: run(None, m), runs=RUNS)[0]
    # each kernel alone (default splits)
    dt, splits = 1, row["default_splits"]
    o_part = cupy.empty((splits + 1, *q.shape), dtype=cupy.float32)
    lse_part = cupy.empty((splits + 1, *q.shape[:2]), dtype=cupy.float32)
    row["prefix_us"] = timer.median_us(lambda: kc.prefix_partials(o_part[:splits], lse_part[:splits], q, k, v, bt,
                                                                  starts, rows, plens, scale, dt), runs=RUNS)[0]
    row["suffix_us"] = timer.median_us(lambda: kc.rows_partial(o_part[splits], lse_part[splits], q, k, v, bt, sufs,
                                                               cl, scale, dt), runs=RUNS)[0]
    row["suffix_merged_us"] = timer.median_us(lambda: kc.rows_partial(
        None, None, q, k, v, bt, sufs, cl, scale, dt, out=out, prefix_o=o_part[:splits],
        prefix_lse=lse_part[:splits]), runs=RUNS)[0]
    row["merge_us"] = timer.median_us(lambda: kc.merge_partials(out, None, o_part, lse_part, sufs, dt), runs=RUNS)[0]
    row["speedup"] = row["plain_us"] / row["cascade_us"]
    row["cascade_vs_floor"] = row["cascade_us"] / row["floor_us"]
    row["saved_tokens"] = (case.group_size - 1) * case.num_groups * (case.prefix // BLOCK_SIZE * BLOCK_SIZE)
    return row


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0],
                   epilog="cases: " + "; ".join(f"{i}: {c.label}" for i, c in enumerate(CASES)))
    p.add_argument("--cases", type=int, nargs="*", help="indices into the case list below (default: all)")
    p.add_argument("--output-json", help="write the JSON here")
    args = p.parse_args(argv)
    for i in args.cases or ():
        cli.in_range("--cases", i, 0, len(CASES) - 1)
    return args


@cli.guarded
def main(argv=None) -> dict:
    args = parse_args(argv)
    cli.require_gpu("cascade_bench measures a GPU")
    import cupy
    from rich.console import Console
    from rich.table import Table

    from pagedkv.kernels import compile as kcompile

    rng = np.random.default_rng(SEED)
    cupy.random.seed(SEED)
    gpu = cli.gpu_name()
    read = make_read_kernel(cupy, kcompile.num_sms(cupy.cuda.Device().id))
    timer = Timer(cupy, read, cupy.ones(FLUSH_BYTES // 4, dtype=cupy.int32))
    result = {"gpu": gpu, "date": str(datetime.date.today()), "runs": RUNS, "block_size": BLOCK_SIZE,
              "dtype": "float16", **ceilings(cupy, timer, read)}
    rows = []
    for i in args.cases if args.cases else range(len(CASES)):
        rows.append(run_case(cupy, timer, rng, CASES[i], result["read_GBps"]))
        cupy.get_default_memory_pool().free_all_blocks()
        if args.output_json:  # NOTE: after each case, so a cut-off run keeps what it measured
            with open(args.output_json, "w") as f:
                json.dump({**result, "cases": rows}, f, indent=1)
    result["cases"] = rows
    table = Table(title=f"cascade decode attention, {gpu}, {result['date']}: read ceiling {result['read_GBps']:.0f} GB/s "
                        f"(float16, block 16; one layer)")
    for col in ("case", "plain us", "cascade us", "speed-up", "floor us", "x floor", "prefix us", "suffix us",
                "suffix+merge us", "merge us", "splits", "variants us", "max |diff|"):
        table.add_column(col, justify="right")
    for r in rows:
        others = " ".join(f"{k[8:-3]}:{v:.1f}" for k, v in r.items() if k[:9] in ("cascade_s", "cascade_m")
                          and k.endswith("_us"))
        table.add_row(r["case"], f"{r['plain_us']:.1f}", f"{r['cascade_us']:.1f}", f"{r['speedup']:.2f}",
                      f"{r['floor_us']:.1f}", f"{r['cascade_vs_floor']:.2f}", f"{r['prefix_us']:.1f}",
                      f"{r['suffix_us']:.1f}", f"{r['suffix_merged_us']:.1f}", f"{r['merge_us']:.1f}",
                      str(r["default_splits"]), others,
                      f"{r['max_abs_diff_vs_plain']:.2g}")
    Console(width=240).print(table)
    return result


if __name__ == "__main__":
    main()
