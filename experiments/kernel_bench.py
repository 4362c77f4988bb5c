"""kernel_bench: paged decode attention against the GPU's read ceiling (``python -m experiments.kernel_bench``).

In one run:
  1. the read ceiling: a read-only reduction over a buffer far larger than L2 (bytes / time);
     the copy bandwidth: a device-to-device copy (bytes read + bytes written) / time;
  2. for each case (float16, block size 16, a shuffled block table = a random permutation of the pool):
     kernel 1, kernel 2 (split-K from the table's capacity), kernel 3 (the balanced walk planned on the
     device), the default (kernel 3's launch with the on-device dispatcher: the walk or the partition
     plan, per launch; the column "mode" says which it took) and, for uniform batches, a non-paged baseline
     (torch ``scaled_dot_product_attention`` on a contiguous copy of the same K/V, when torch is importable);
     then the same case with an fp8 e4m3 cache (uint8 bytes, scales 1/64; random bytes, NaN codes
     excluded): kernel 2, kernel 3 and the default, % of the read ceiling counting the fp8 bytes.
     Uniform cases: issue 3's table (head_dim 128). Ragged cases: lengths drawn uniformly (seeded) from
     a range, issue 11's table plus a mixed batch, head dims 64 and 80, and issue 16's Qwen2.5-7B shape
     (28 query / 4 KV heads). ``--variants`` also times the compile-time variants of kernels 2 and 3;
     ``--v4`` also times version 4 (tensor cores, opt-in; head dims 64 / 128 only) on the float16 and the fp8
     cache (columns v4 and fp8 v4; its output compared with kernel 1's and the fp8 kernel 2's; fp8 v4 regs: the
     fp8 register path, regs x16 its time over the float16 v4's), and the engine's
     kernel per step (``decode.choose_version`` on the case's lengths: version 4 with the length split, column
     v4 len, or the default; columns engine, engine %, fp8 engine %: the time of the kernel it picks, same run).

Every timed launch is bracketed by CUDA events after an L2 flush (a 512 MB read), so no case is served from
L2; the flush also lets the host enqueue the launch before the GPU reaches it. Median of RUNS launches.
GB/s counts the K/V bytes (each cached K and V element of every sequence's context read once); % is of the
measured read ceiling. Writes ``benchmarks/results/kernel_bench_<gpu>_<date>.json`` (or ``--output-json``).

Over 400 lines because the read ceiling, every case, every kernel version, the fp8 column and the SDPA
baseline are timed by one timer in one process (a ratio compares two things timed in the same run).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pagedkv.kernels import compile, decode, decode_plan, decode_tc

from . import cli

SEED = 0
RUNS = 50
WARMUP = 3
SLOW_V1_US = 5000  # kernel 1 has no speed target: above this per launch it gets V1_SLOW_RUNS runs
V1_SLOW_RUNS = 10
CEILING_BYTES = 4 << 30
FLUSH_BYTES = 512 << 20
BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class Case:
    """``batch`` sequences of ``lens`` tokens: an int (uniform), a (lo, hi) range drawn uniformly, or
    ``(long, lo, hi)``: one sequence of ``long`` tokens and the rest drawn from [lo, hi]."""
    batch: int
    lens: int | tuple
    num_qo_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    target_pct: float | None = None  # for the default kernel, % of the read ceiling

    @property
    def ragged(self) -> bool:
        return not isinstance(self.lens, int)

    def label(self) -> str:
        if not self.ragged:
            batch = f"{self.batch} x {self.lens}"
        elif len(self.lens) == 2:
            batch = f"{self.batch} x U[{self.lens[0]}, {self.lens[1]}]"
        else:
            batch = f"1 x {self.lens[0]} + {self.batch - 1} x U[{self.lens[1]}, {self.lens[2]}]"
        return f"{batch}, {self.num_qo_heads}/{self.num_kv_heads} heads, hd {self.head_dim}"

    def context_lens(self, rng) -> np.ndarray:
        if not self.ragged:
            return np.full(self.batch, self.lens, dtype=np.int32)
        lo, hi = self.lens[-2:]
        lens = rng.integers(lo, hi + 1, self.batch).astype(np.int32)
        if len(self.lens) == 3:
            lens[rng.integers(self.batch)] = self.lens[0]
        return lens


CASES = (  # uniform: issue 3's table, then ragged: issue 11's table and a few more
    Case(1, 32768, target_pct=70), Case(8, 4096, target_pct=70), Case(32, 8192, target_pct=92),
    Case(16, 16384, target_pct=92), Case(64, 2048, target_pct=90), Case(128, 1024, target_pct=90),
    Case(256, 512, target_pct=90), Case(64, 2048, 32, 32, target_pct=97),
    Case(32, (1000, 32000), target_pct=88), Case(128, (64, 4096), target_pct=85), Case(200, (17, 700), target_pct=80),
    Case(128, (32768, 16, 512)), Case(64, (256, 8192), 32, 32), Case(128, (64, 4096), 32, 8, 64),
    Case(128, (64, 4096), 32, 8, 80), Case(12, (1, 2048), 28, 4, target_pct=70),
)
FP8_SCALE = 1 / 64  # k_scale = v_scale of the fp8 cases
# compile-time variants timed beside each kernel's default: name -> (tile bytes, stages, extra defines)
V2_VARIANTS = {
    "default": (4096, 4, ()),
    "plain": (4096, 4, (("PAGEDKV_V2_BUTTERFLY", 0), ("PAGEDKV_V2_LAZY_RESCALE", 0))),  # call-2 kernel, 4 stages
    "s6": (4096, 6, ()),
    "t8192": (8192, 4, ()),
}
V3_VARIANTS = {"default": (4096, 4, ()), "s3": (4096, 3, ()), "t8192": (8192, 4, ())}


class Timer:
    """Median of CUDA-event-timed launches, each after an L2 flush."""

    def __init__(self, cupy, read_kernel, flush_buf):
        self.cp, self.read, self.flush_buf = cupy, read_kernel, flush_buf
        self.start, self.end = cupy.cuda.Event(), cupy.cuda.Event()

    def median_us(self, fn, runs=RUNS) -> tuple[float, list[float]]:
        for _ in range(WARMUP):
            fn()
        times = []
        for _ in range(runs):
            self.read(self.flush_buf)
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            times.append(self.cp.cuda.get_elapsed_time(self.start, self.end) * 1e3)
        return statistics.median(times), times


def make_read_kernel(cupy, sms):
    fn = compile.load_function("bench_ops.cu", "read_ceiling_kernel1")
    sink = cupy.zeros(1, dtype=cupy.uint32)

    def read(buf):
        fn((sms * 8,), (256,), (buf, cupy.int64(buf.nbytes // 16), cupy.uint32(0x9E3779B9), sink))

    return read


def ceilings(cupy, timer, read) -> dict:
    buf = cupy.random.randint(0, 2**31, CEILING_BYTES // 4, dtype=cupy.int32)
    read_us, _ = timer.median_us(lambda: read(buf), runs=20)
    half = CEILING_BYTES // 2
    src, dst = buf[: half // 4], buf[half // 4 : half // 2]  # the two 2 GiB halves
    copy_us, _ = timer.median_us(lambda: dst.data.copy_from_device(src.data, src.nbytes), runs=20)
    out = {"read_GBps": CEILING_BYTES / read_us / 1e3, "read_bytes": CEILING_BYTES,
           "copy_GBps": 2 * src.nbytes / copy_us / 1e3, "copy_bytes_moved": 2 * src.nbytes}
    del buf
    return out


def fp8_pools(cupy, shape):
    """Random e4m3 K/V bytes (uint8; the NaN codes 0x7f / 0xff moved to the largest finite values)."""
    pools = []
    for _ in range(2):
        b = cupy.random.randint(0, 256, shape, dtype=cupy.int32).astype(cupy.uint8)
        b[(b & 0x7F) == 0x7F] -= 1
        pools.append(b)
    return pools


def build_case(cupy, rng, case: Case):
    """q, K/V pools holding exactly the batch's blocks, a shuffled block table, context_lens (device)."""
    lens = case.context_lens(rng)
    blocks = -(-lens // BLOCK_SIZE)
    num_blocks = int(blocks.sum())
    shape = (num_blocks, case.num_kv_heads, BLOCK_SIZE, case.head_dim)
    k = cupy.random.standard_normal(shape, dtype=cupy.float32).astype(cupy.float16)
    v = cupy.random.standard_normal(shape, dtype=cupy.float32).astype(cupy.float16)
    perm = rng.permutation(num_blocks).astype(np.int32)
    table = np.zeros((case.batch, int(blocks.max())), dtype=np.int32)
    for i, start in enumerate(np.concatenate([[0], np.cumsum(blocks)[:-1]])):
        table[i, : blocks[i]] = perm[start : start + blocks[i]]
    q = cupy.random.standard_normal((case.batch, case.num_qo_heads, case.head_dim), dtype=cupy.float32)
    kv_bytes = int(lens.sum()) * case.num_kv_heads * case.head_dim * 2 * 2  # K and V, 2 bytes each
    return q.astype(cupy.float16), k, v, cupy.asarray(table), cupy.asarray(lens), kv_bytes


def sdpa_baseline(cupy, timer, q, k, v, block_tables):
    """torch SDPA on a contiguous [batch, kv_heads, context, head_dim] copy (uniform batches); None
    without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None, None
    batch, blocks = block_tables.shape

    def dense(cache):  # [B, blocks, H, bs, D] -> [B, H, blocks*bs, D]
        g = cache[block_tables.ravel()].reshape(batch, blocks, *cache.shape[1:])
        return torch.from_dlpack(cupy.ascontiguousarray(g.transpose(0, 2, 1, 3, 4)).reshape(
            batch, cache.shape[1], blocks * BLOCK_SIZE, cache.shape[3]))

    tk, tv = dense(k), dense(v)
    tq = torch.from_dlpack(q).unsqueeze(2)
    gqa = q.shape[1] != k.shape[1]
    run = lambda: F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=gqa)  # noqa: E731
    us, _ = timer.median_us(run)
    out = cupy.from_dlpack(run().squeeze(2).contiguous())
    del tk, tv
    return us, out


def _rel_err(cupy, a, ref) -> float:
    return float(cupy.linalg.norm(a.astype(cupy.float32) - ref) / cupy.linalg.norm(ref))


def _time_variants(cupy, timer, row, version, variants, attn, out, ref) -> None:
    """Time every compile-time variant of one kernel (``attn(version, **variant)`` writes ``out``) and
    compare its output with ``ref``."""
    for name, (tile, stages, extra) in variants.items():
        key = f"v{version}_{name}"
        try:
            us, times = timer.median_us(attn(version, tile_bytes=tile, stages=stages, extra_defines=extra))
        except Exception as exc:  # a variant may not build or launch; the default must
            if name == "default":
                raise
            row[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:500]
            us = float("nan")
        row[f"{key}_us"] = us
        if name == "default":
            row[f"v{version}_us"], row[f"v{version}_spread_us"] = us, [min(times), max(times)]
        if us == us and ref is not None:  # every variant computes the same function
            row[f"{key}_rel_err"] = _rel_err(cupy, out, ref)


def run_fp8(cupy, timer, row, q, shape, bt, cl, v4: bool = False) -> None:
    """The case with an fp8 e4m3 cache of the same shape: kernel 2, kernel 3, the default (and version 4)."""
    k8, v8 = fp8_pools(cupy, shape)
    out = cupy.empty_like(q)
    kw = dict(kv_dtype="fp8_e4m3", k_scale=FP8_SCALE, v_scale=FP8_SCALE, out=out, check=False)
    outs = {}
    for key, version in (("fp8_v2", 2), ("fp8_v3", 3), ("fp8_default", None)):
        run = lambda: decode.paged_attention(q, k8, v8, bt, cl, version=version, **kw)  # noqa: E731
        us, times = timer.median_us(run)
        row[f"{key}_us"], row[f"{key}_spread_us"] = us, [min(times), max(times)]
        outs[key] = out.astype(cupy.float32)
    plan = decode.v3_launch_plan(q.shape, shape, 1, ct=3, max_blocks=bt.shape[1])
    row["fp8_default_choice"] = decode.last_dispatch(q.shape, shape, 1, ct=3, max_blocks=bt.shape[1])
    row["fp8_v3_plan"] = {key: plan[key] for key in ("gt", "ctas", "blocks_per_sm", "smem", "num_regs", "tile_tokens")}
    if v4:
        _time_v4(cupy, timer, row, "fp8_v4", lambda: decode.paged_attention(q, k8, v8, bt, cl, version=4, **kw), out,
                 outs["fp8_v2"], decode_tc.launch_plan, (q.shape, shape, bt.shape[1], 1, 3))
        _time_v4(cupy, timer, row, "fp8_v4_length",
                 lambda: decode.paged_attention(q, k8, v8, bt, cl, version=4, split="length", **kw), out,
                 outs["fp8_v2"], decode_tc.launch_plan, (q.shape, shape, bt.shape[1], 1, 3))
        _time_v4(cupy, timer, row, "fp8_v4_regs",  # the register path (no converted tile), capacity split
                 lambda: decode.paged_attention(q, k8, v8, bt, cl, version=4, fp8_path="registers", **kw), out,
                 outs["fp8_v2"], decode_tc.launch_plan, (q.shape, shape, bt.shape[1], 1, 3, None, "registers"))
    for key in ("fp8_v3", "fp8_default"):  # the same bytes: kernel 2 is the yardstick
        row[f"{key}_vs_v2_rel_err"] = _rel_err(cupy, outs[key], outs["fp8_v2"])
    row["fp8_kv_bytes"] = row["kv_bytes"] // 2
    del k8, v8


def _time_v4(cupy, timer, row, key, run, out, ref, plan_fn, plan_args) -> None:
    """Version 4 (tensor cores): time, plan, error against ``ref``; a shape it refuses leaves ``<key>_error``."""
    try:
        us, times = timer.median_us(run)
    except ValueError as exc:  # head_dim 80 and other shapes version 4 does not serve
        row[f"{key}_error"] = str(exc)[:300]
        return
    row[f"{key}_us"], row[f"{key}_spread_us"] = us, [min(times), max(times)]
    ref_name = "v2" if key.startswith("fp8") else "v1"
    row[f"{key}_vs_{ref_name}_rel_err"] = _rel_err(cupy, out, ref)
    plan = plan_fn(*plan_args)
    row[f"{key}_plan"] = {k: plan[k] for k in ("parts", "part_tokens", "smem", "blocks_per_sm", "num_regs")}


def run_case(cupy, timer, rng, case: Case, variants: bool = False, v4: bool = False) -> dict:
    q, k, v, bt, cl, kv_bytes = build_case(cupy, rng, case)
    out = cupy.empty_like(q)
    lens = cupy.asnumpy(cl)
    row = {"batch": case.batch, "context": int(lens.max()), "num_qo_heads": case.num_qo_heads,
           "num_kv_heads": case.num_kv_heads, "head_dim": case.head_dim, "kv_bytes": kv_bytes,
           "target_pct": case.target_pct, "ragged": case.ragged,
           "lens": {"min": int(lens.min()), "max": int(lens.max()), "mean": float(lens.mean())}}
    if case.ragged:
        row["case"] = case.label()

    def attn(version, **kw):
        return lambda: decode.paged_attention(q, k, v, bt, cl, version=version, out=out, check=False, **kw)

    first = timer.median_us(attn(1), runs=1)[0]
    row["v1_runs"] = RUNS if first < SLOW_V1_US else V1_SLOW_RUNS
    row["v1_us"] = timer.median_us(attn(1), runs=row["v1_runs"])[0]
    ref = out.astype(cupy.float32)  # kernel 1: the obviously-correct one
    only_default = lambda table: table if variants else {"default": table["default"]}  # noqa: E731
    _time_variants(cupy, timer, row, 2, only_default(V2_VARIANTS) if not case.ragged
                   else {"default": V2_VARIANTS["default"]}, attn, out, ref)
    _time_variants(cupy, timer, row, 3, only_default(V3_VARIANTS), attn, out, ref)
    us, times = timer.median_us(attn(None))  # the default: kernel 3's launch with the dispatcher
    row["default_us"], row["default_spread_us"] = us, [min(times), max(times)]
    row["default_vs_v1_rel_err"] = _rel_err(cupy, out, ref)
    row["default_choice"] = decode.last_dispatch(q.shape, k.shape, 1, max_blocks=bt.shape[1])
    group = case.num_qo_heads // case.num_kv_heads
    if group & (group - 1):  # a group that is not a power of two (Qwen2.5's 7): GT 4 (two head tiles) beside GT 8
        us, times = timer.median_us(attn(None, group_tile=4))
        row["default_gt4_us"], row["default_gt4_spread_us"] = us, [min(times), max(times)]
        row["default_gt4_rel_err"] = _rel_err(cupy, out, ref)
        row["default_gt4_choice"] = decode.last_dispatch(q.shape, k.shape, 1, max_blocks=bt.shape[1], gt=4)
    if v4:
        _time_v4(cupy, timer, row, "v4", attn(4), out, ref, decode_tc.launch_plan,
                 (q.shape, k.shape, bt.shape[1], 1, 1))
        _time_v4(cupy, timer, row, "v4_length", attn(4, split="length"), out, ref, decode_tc.launch_plan,
                 (q.shape, k.shape, bt.shape[1], 1, 1))
    row["default_with_check_us"] = timer.median_us(  # check=True: one reduction + a 16-byte read, host waits
        lambda: decode.paged_attention(q, k, v, bt, cl, out=out, check=True), runs=20)[0]
    row["v2_vs_v1_rel_err"], row["v3_vs_v1_rel_err"] = row["v2_default_rel_err"], row["v3_default_rel_err"]
    row["sdpa_us"] = None
    if not case.ragged:
        row["sdpa_us"], sdpa_out = sdpa_baseline(cupy, timer, q, k, v, bt)
        if sdpa_out is not None:
            row["sdpa_vs_v1_rel_err"] = _rel_err(cupy, sdpa_out, ref)
    for name, (tile, stages, extra) in (V2_VARIANTS if variants else {"default": V2_VARIANTS["default"]}).items():
        plan = decode.v2_launch_plan(q.shape, k.shape, bt.shape[1], 1, None, tile, stages, extra)
        row[f"v2_{name}_plan"] = {key: plan[key] for key in
                                  ("gt", "parts", "part_tokens", "smem", "resident_ctas", "num_regs")}
    plan = decode.v3_launch_plan(q.shape, k.shape, 1, max_blocks=bt.shape[1])
    balanced = decode_plan.balanced_plan(lens, case.num_kv_heads * plan["q_tiles"], plan["tile_tokens"],
                                         plan["ctas"], plan["min_tiles"])
    row["v3_default_plan"] = {**{key: plan[key] for key in ("gt", "ctas", "blocks_per_sm", "min_tiles", "smem",
                                                           "num_regs", "tile_tokens")},
                              "per_block_tiles": balanced.per_block, "pieces": len(balanced.pieces),
                              "merges": len(balanced.merges)}
    row["v2_partitions"] = row["v2_default_plan"]["parts"]
    mode, parts, part_tokens = decode_plan.dispatch(lens, case.num_kv_heads * plan["q_tiles"], plan["tile_tokens"],
                                                     plan["ctas"], plan["max_parts"])
    row["default_host_mirror"] = {"mode": mode, "parts": parts, "part_tokens": part_tokens}
    shape = k.shape
    del k, v
    cupy.get_default_memory_pool().free_all_blocks()
    run_fp8(cupy, timer, row, q, shape, bt, cl, v4)
    if v4:  # the engine's kernel per step (decode.choose_version on the host lengths): version 4 or the default
        for prefix, ct in (("", 1), ("fp8_", 3)):
            choice = decode.choose_version(q.shape, shape, bt.shape[1], 1, ct, lens)
            row[f"{prefix}engine_choice"] = "v4" if choice == 4 else "default"
            row[f"{prefix}engine_us"] = row.get(f"{prefix}{'v4_length' if choice == 4 else 'default'}_us")
    return row


def prewarm(cases, variants: bool, v4: bool = False) -> float:
    """Compile every module the cases will launch, 16 at a time (NVRTC runs outside the GIL), so the
    compiles overlap instead of adding up; returns the seconds it took."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    jobs = set()
    for case in cases:
        gt = decode_plan.group_tile(case.num_qo_heads // case.num_kv_heads)
        jobs.add(("v1", 1, case.head_dim, 0, 4096, 4, (), None))
        for tile, stages, extra in (V2_VARIANTS if variants else {"d": V2_VARIANTS["default"]}).values():
            jobs.add(("v2", 1, case.head_dim, gt, tile, stages, extra, None))
        for tile, stages, extra in (V3_VARIANTS if variants else {"d": V3_VARIANTS["default"]}).values():
            jobs.add(("v3", 1, case.head_dim, gt, tile, stages, extra, None))
        for kind in ("v2", "v3"):
            jobs.add((kind, 1, case.head_dim, gt, 4096, 4, (), 3))
        if gt != case.num_qo_heads // case.num_kv_heads and gt == 8:  # the GT 4 variant of a group of 5-7
            jobs.add(("v3", 1, case.head_dim, 4, 4096, 4, (), None))
    v4_jobs = sorted({(1, c.head_dim, ct, path) for c in cases
                      for ct, path in ((1, "tile"), (3, "tile"), (3, "registers"))
                      if v4 and c.head_dim in decode_tc.HEAD_DIMS})
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda job: decode.attention_kernel(*job), sorted(jobs, key=str)))
        list(pool.map(lambda job: decode_tc.attention_kernel(*job), v4_jobs))
    return time.perf_counter() - t0


def _writable(flag: str, path: Path, is_dir: bool) -> Path:
    """``path`` (a folder, or a file to write) usable before minutes of measuring, else a one-line error."""
    folder = path if is_dir else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cli.FlagError(f"{flag} {path}: cannot create {folder} ({exc.strerror})") from None
    if not os.access(folder, os.W_OK) or (not is_dir and path.exists() and
                                          (path.is_dir() or not os.access(path, os.W_OK))):
        raise cli.FlagError(f"{flag} {path}: not writable")
    return path


def parse_args(argv):
    parser = cli.Parser(description=__doc__.splitlines()[0],
                        epilog="cases: " + "; ".join(f"{i}: {c.label()}" for i, c in enumerate(CASES)))
    parser.add_argument("--cases", type=int, nargs="*", help="indices into the case list below (default: all)")
    parser.add_argument("--out-dir", default="benchmarks/results", help="folder of the default JSON name")
    parser.add_argument("--output-json", default=None, metavar="PATH",
                        help="write the JSON here instead of <out-dir>/kernel_bench_<gpu>_<date>.json")
    parser.add_argument("--plot", default=None, metavar="PATH", help="also draw the bandwidth PNG (needs matplotlib)")
    parser.add_argument("--variants", action="store_true",
                        help="also time the compile-time variants of kernels 2 and 3 (tile bytes, stages, ...)")
    parser.add_argument("--v4", action="store_true",
                        help="also time decode version 4 (tensor cores, opt-in) on the float16 and fp8 caches")
    args = parser.parse_args(argv)
    for i in args.cases or ():
        cli.in_range("--cases", i, 0, len(CASES) - 1)
    _writable("--out-dir", Path(args.out_dir), is_dir=True)
    if args.output_json:
        _writable("--output-json", Path(args.output_json), is_dir=False)
    if args.plot:
        _writable("--plot", Path(args.plot), is_dir=False)
        from . import plots

        plots.check_available("--plot")  # before minutes of measuring, not after
    return args


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"paged decode attention, {result['gpu']}: read ceiling {result['read_GBps']:.0f} GB/s, "
                        f"copy {result['copy_GBps']:.0f} GB/s (block 16, shuffled tables); v2 = capacity split-K, "
                        f"v3 = balanced walk, dflt = default (dispatcher; mode P = partition plan, W = walk); "
                        f"fp8 = e4m3 cache, % of the ceiling counting fp8 bytes, x16 = fp8 / fp16 time of the default")
    cols = ["case", "KV MB", "v1 us", "v2 us", "v2 %", "v3 us", "v3 %", "dflt us", "dflt %", "mode", "target %",
            "sdpa %", "fp8 v2 %", "fp8 v3 %", "fp8 dflt us", "fp8 dflt %", "fp8 mode", "x16", "dflt GT4 %"]
    if result.get("variants"):
        cols += ["v2 plain us", "v2 s6 us", "v2 t8192 us", "v3 s3 us", "v3 t8192 us"]
    if result.get("v4"):
        cols += ["v4 us", "v4 %", "fp8 v4 us", "fp8 v4 %", "v4 x16", "v4 len %", "engine", "engine %",
                 "fp8 engine %", "fp8 v4 regs %", "regs x16"]
    for col in cols:
        table.add_column(col, justify="right")
    fmt = lambda r, key, spec=".1f": "-" if r.get(key) is None or r[key] != r[key] else format(r[key], spec)  # noqa: E731
    mode = lambda c: "-" if not c else f"{'P' if c['mode'] == 2 else 'W'}{c['parts'] if c['mode'] == 2 else ''}"  # noqa: E731
    for r in result["cases"]:
        label = r.get("case") or f"{r['batch']} x {r['context']}, {r['num_qo_heads']}/{r['num_kv_heads']}"
        cells = [label, f"{r['kv_bytes'] / 1e6:.0f}", fmt(r, "v1_us", ".0f"), fmt(r, "v2_us"), fmt(r, "v2_pct"),
                 fmt(r, "v3_us"), fmt(r, "v3_pct"), fmt(r, "default_us"), fmt(r, "default_pct"),
                 mode(r.get("default_choice")), "-" if r["target_pct"] is None else f">= {r['target_pct']}",
                 fmt(r, "sdpa_pct"), fmt(r, "fp8_v2_pct"), fmt(r, "fp8_v3_pct"), fmt(r, "fp8_default_us"),
                 fmt(r, "fp8_default_pct"), mode(r.get("fp8_default_choice")), fmt(r, "fp8_vs_fp16", ".2f"),
                 fmt(r, "default_gt4_pct")]
        if result.get("variants"):
            cells += [fmt(r, "v2_plain_us"), fmt(r, "v2_s6_us"), fmt(r, "v2_t8192_us"), fmt(r, "v3_s3_us"),
                      fmt(r, "v3_t8192_us")]
        if result.get("v4"):
            cells += [fmt(r, "v4_us"), fmt(r, "v4_pct"), fmt(r, "fp8_v4_us"), fmt(r, "fp8_v4_pct"),
                      fmt(r, "fp8_v4_vs_fp16", ".2f"), fmt(r, "v4_length_pct"), r.get("engine_choice", "-"),
                      fmt(r, "engine_pct"),
                      fmt(r, "fp8_engine_pct"), fmt(r, "fp8_v4_regs_pct"), fmt(r, "fp8_v4_regs_vs_fp16", ".2f")]
        table.add_row(*cells)
    Console(width=260).print(table)


@cli.guarded
def main(argv=None) -> dict:
    args = parse_args(argv)
    cli.require_gpu("kernel_bench measures a GPU")

    import cupy

    rng = np.random.default_rng(SEED)
    cupy.random.seed(SEED)
    props = cupy.cuda.runtime.getDeviceProperties(0)
    gpu = cli.gpu_name()
    sms = compile.num_sms(cupy.cuda.Device().id)
    read = make_read_kernel(cupy, sms)
    timer = Timer(cupy, read, cupy.ones(FLUSH_BYTES // 4, dtype=cupy.int32))
    result = {"gpu": gpu, "sms": sms, "l2_bytes": props.get("l2CacheSize"), "date": str(datetime.date.today()),
              "runs": RUNS, "head_dim": 128, "block_size": BLOCK_SIZE, "dtype": "float16",
              "default_version": "dispatcher (kernel 3's launch, mode 0)", "fp8_kv_dtype": "fp8_e4m3",
              "fp8_scale": FP8_SCALE, "variants": args.variants, "v4": args.v4}
    result.update(ceilings(cupy, timer, read))
    chosen = args.cases if args.cases else range(len(CASES))
    result["prewarm_s"] = prewarm([CASES[i] for i in chosen], args.variants, args.v4)
    print(f"compiled the kernels in {result['prewarm_s']:.1f} s", flush=True)
    rows = []
    for i in chosen:
        rows.append(run_case(cupy, timer, rng, CASES[i], args.variants, args.v4))
        cupy.get_default_memory_pool().free_all_blocks()
    for row in rows:
        for key, nbytes in (("v1", "kv_bytes"), ("v2", "kv_bytes"), ("v3", "kv_bytes"), ("default", "kv_bytes"),
                            ("default_gt4", "kv_bytes"),
                            ("sdpa", "kv_bytes"), ("fp8_v2", "fp8_kv_bytes"), ("fp8_v3", "fp8_kv_bytes"),
                            ("fp8_default", "fp8_kv_bytes"), ("v4", "kv_bytes"), ("fp8_v4", "fp8_kv_bytes"),
                            ("engine", "kv_bytes"), ("fp8_engine", "fp8_kv_bytes"), ("v4_length", "kv_bytes"),
                            ("fp8_v4_length", "fp8_kv_bytes"), ("fp8_v4_regs", "fp8_kv_bytes")):
            if row.get(f"{key}_us"):
                row[f"{key}_GBps"] = row[nbytes] / row[f"{key}_us"] / 1e3
                row[f"{key}_pct"] = 100 * row[f"{key}_GBps"] / result["read_GBps"]
        if row.get("fp8_default_us") and row.get("default_us"):
            row["fp8_vs_fp16"] = row["fp8_default_us"] / row["default_us"]
        if row.get("fp8_v4_us") and row.get("v4_us"):
            row["fp8_v4_vs_fp16"] = row["fp8_v4_us"] / row["v4_us"]
        if row.get("fp8_v4_regs_us") and row.get("v4_us"):
            row["fp8_v4_regs_vs_fp16"] = row["fp8_v4_regs_us"] / row["v4_us"]
    result["cases"] = rows
    print_table(result)
    name = f"kernel_bench_{re.sub(r'[^A-Za-z0-9]+', '_', gpu).strip('_')}_{result['date']}.json"
    path = Path(args.output_json) if args.output_json else Path(args.out_dir) / name
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    if args.plot:
        from . import plots

        print(f"wrote {plots.kernel_bandwidth(result, args.plot)}")
    return result


if __name__ == "__main__":
    main()
