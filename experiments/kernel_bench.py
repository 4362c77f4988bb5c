"""kernel_bench: paged decode attention against the GPU's read ceiling (``python -m experiments.kernel_bench``).

In one run:
  1. the read ceiling: a read-only reduction over a buffer far larger than L2 (bytes / time);
     the copy bandwidth: a device-to-device copy (bytes read + bytes written) / time;
  2. for each case of issue 3's table (float16, head_dim 128, block size 16): kernel 1, kernel 2 and a
     non-paged baseline (torch ``scaled_dot_product_attention`` on a contiguous copy of the same K/V, when
     torch is importable), with a shuffled block table (a random permutation of the pool).

Every timed launch is bracketed by CUDA events after an L2 flush (a 512 MB read), so no case is served from
L2; the flush also lets the host enqueue the launch before the GPU reaches it. Median of RUNS launches.
GB/s counts the K/V bytes (each cached K and V element read once); % is of the measured read ceiling.
Writes ``benchmarks/results/kernel_bench_<gpu>_<date>.json``.
"""
from __future__ import annotations

import datetime
import json
import re
import statistics
from pathlib import Path

import numpy as np

from . import cli

SEED = 0
RUNS = 50
WARMUP = 3
SLOW_V1_US = 5000  # kernel 1 has no speed target: above this per launch it gets V1_SLOW_RUNS runs
V1_SLOW_RUNS = 10
CEILING_BYTES = 4 << 30
FLUSH_BYTES = 512 << 20
HEAD_DIM, BLOCK_SIZE = 128, 16
# (batch, context, num_qo_heads, num_kv_heads, kernel-2 target in % of the read ceiling)
CASES = (
    (1, 32768, 32, 8, 70), (8, 4096, 32, 8, 70), (32, 8192, 32, 8, 92), (16, 16384, 32, 8, 92),
    (64, 2048, 32, 8, 90), (128, 1024, 32, 8, 90), (256, 512, 32, 8, 90), (64, 2048, 32, 32, 97),
)
# kernel-2 compile-time variants timed beside the default: name -> (tile bytes, stages, extra defines)
V2_VARIANTS = {
    "default": (4096, 4, ()),
    "plain": (4096, 4, (("PAGEDKV_V2_BUTTERFLY", 0), ("PAGEDKV_V2_LAZY_RESCALE", 0))),  # call-2 kernel, 4 stages
    "s6": (4096, 6, ()),
    "t8192": (8192, 4, ()),
}


class Timer:
    """Median of CUDA-event-timed launches, each after an L2 flush."""

    def __init__(self, cupy, read_kernel, flush_buf):
        self.cp, self.read, self.flush_buf = cupy, read_kernel, flush_buf
        self.start, self.end = cupy.cuda.Event(), cupy.cuda.Event()

    def flush(self):
        self.read(self.flush_buf)

    def median_us(self, fn, runs=RUNS) -> tuple[float, list[float]]:
        for _ in range(WARMUP):
            fn()
        times = []
        for _ in range(runs):
            self.flush()
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            times.append(self.cp.cuda.get_elapsed_time(self.start, self.end) * 1e3)
        return statistics.median(times), times


def make_read_kernel(cupy, kernels, sms):
    fn = kernels._function("bench_ops.cu", "read_ceiling_kernel1")
    sink = cupy.zeros(1, dtype=cupy.uint32)

    def read(buf):
        n_vec = buf.nbytes // 16
        fn((sms * 8,), (256,), (buf, cupy.int64(n_vec), cupy.uint32(0x9E3779B9), sink))

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


def build_case(cupy, rng, batch, context, num_qo_heads, num_kv_heads):
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, num_kv_heads, BLOCK_SIZE, HEAD_DIM)
    k = cupy.random.standard_normal(shape, dtype=cupy.float32).astype(cupy.float16)
    v = cupy.random.standard_normal(shape, dtype=cupy.float32).astype(cupy.float16)
    block_tables = cupy.asarray(rng.permutation(num_blocks).astype(np.int32).reshape(batch, blocks_per_seq))
    context_lens = cupy.full(batch, context, dtype=cupy.int32)
    q = cupy.random.standard_normal((batch, num_qo_heads, HEAD_DIM), dtype=cupy.float32).astype(cupy.float16)
    return q, k, v, block_tables, context_lens


def sdpa_baseline(cupy, timer, q, k, v, block_tables):
    """torch SDPA on a contiguous [batch, kv_heads, context, head_dim] copy; None without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None, None
    batch, blocks = block_tables.shape

    def dense(cache):  # [B, blocks, H, bs, D] -> [B, H, blocks*bs, D]
        g = cache[block_tables.ravel()].reshape(batch, blocks, *cache.shape[1:])
        return torch.from_dlpack(cupy.ascontiguousarray(g.transpose(0, 2, 1, 3, 4)).reshape(
            batch, cache.shape[1], blocks * BLOCK_SIZE, HEAD_DIM))

    tk, tv = dense(k), dense(v)
    tq = torch.from_dlpack(q).unsqueeze(2)
    gqa = q.shape[1] != k.shape[1]
    run = lambda: F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=gqa)  # noqa: E731
    us, _ = timer.median_us(run)
    out = cupy.from_dlpack(run().squeeze(2).contiguous())
    del tk, tv
    return us, out


def run_case(cupy, kernels, timer, rng, batch, context, num_qo_heads, num_kv_heads, target) -> dict:
    q, k, v, bt, cl = build_case(cupy, rng, batch, context, num_qo_heads, num_kv_heads)
    kv_bytes = k.nbytes + v.nbytes
    out = cupy.empty_like(q)
    row = {"batch": batch, "context": context, "num_qo_heads": num_qo_heads, "num_kv_heads": num_kv_heads,
           "kv_bytes": kv_bytes, "target_pct": target}

    def attn(version, **kw):
        return lambda: kernels.paged_attention(q, k, v, bt, cl, version=version, out=out, check=False, **kw)

    first = timer.median_us(attn(1), runs=1)[0]
    row["v1_runs"] = RUNS if first < SLOW_V1_US else V1_SLOW_RUNS
    row["v1_us"] = timer.median_us(attn(1), runs=row["v1_runs"])[0]
    v1_out = out.astype(cupy.float32)
    for name, (tile, stages, extra) in V2_VARIANTS.items():
        default = name == "default"
        try:
            us, times = timer.median_us(attn(2, tile_bytes=tile, stages=stages, extra_defines=extra))
        except Exception as exc:  # a variant may not build or launch; the default must
            if default:
                raise
            row[f"v2_{name}_error"] = f"{type(exc).__name__}: {exc}"[:500]
            us = float("nan")
        row[f"v2_{name}_us"] = us
        if default:
            row["v2_us"], row["v2_spread_us"] = us, [min(times), max(times)]
            v2_out = out.astype(cupy.float32)
        elif us == us:  # the variant computes the same function
            row[f"v2_{name}_rel_err"] = float(cupy.linalg.norm(out.astype(cupy.float32) - v2_out)
                                              / cupy.linalg.norm(v2_out))
    row["v2_with_check_us"] = timer.median_us(  # check=True: one reduction + a 16-byte read, host waits
        lambda: kernels.paged_attention(q, k, v, bt, cl, out=out, check=True), runs=20)[0]
    row["v1_vs_v2_rel_err"] = float(cupy.linalg.norm(v1_out - v2_out) / cupy.linalg.norm(v2_out))
    sdpa_us, sdpa_out = sdpa_baseline(cupy, timer, q, k, v, bt)
    row["sdpa_us"] = sdpa_us
    if sdpa_out is not None:
        row["sdpa_vs_v2_rel_err"] = float(cupy.linalg.norm(sdpa_out.astype(cupy.float32) - v2_out)
                                          / cupy.linalg.norm(v2_out))
    for name, (tile, stages, extra) in V2_VARIANTS.items():
        try:
            plan = kernels.v2_launch_plan(q.shape, k.shape, bt.shape[1], 1, None, tile, stages, extra)
            row[f"v2_{name}_plan"] = {key: plan[key] for key in
                                      ("gt", "parts", "part_tokens", "smem", "resident_ctas", "num_regs")}
        except Exception as exc:
            row[f"v2_{name}_plan"] = f"{type(exc).__name__}: {exc}"[:300]
    row["v2_partitions"] = row["v2_default_plan"]["parts"]
    return row


@cli.guarded
def main(argv=None) -> dict:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, nargs="*", help="indices into CASES (default: all)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--plot", default=None, metavar="PATH", help="also draw the bandwidth PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.plot:
        from . import plots

        plots.check_available("--plot")  # before minutes of measuring, not after
    from pagedkv.backend import gpu_status

    usable, reason = gpu_status()
    if not usable:  # one line and exit code 2, no traceback
        raise cli.FlagError(f"kernel_bench measures a GPU and none is usable: {reason}")

    import cupy
    from rich.console import Console
    from rich.table import Table

    from pagedkv import kernels

    rng = np.random.default_rng(SEED)
    cupy.random.seed(SEED)
    props = cupy.cuda.runtime.getDeviceProperties(0)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    sms = kernels.num_sms(cupy.cuda.Device().id)
    read = make_read_kernel(cupy, kernels, sms)
    timer = Timer(cupy, read, cupy.ones(FLUSH_BYTES // 4, dtype=cupy.int32))
    result = {"gpu": gpu, "sms": sms, "l2_bytes": props.get("l2CacheSize"), "date": str(datetime.date.today()),
              "runs": RUNS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE, "dtype": "float16"}
    result.update(ceilings(cupy, timer, read))
    ceiling = result["read_GBps"]
    rows = []
    for i in args.cases if args.cases else range(len(CASES)):
        rows.append(run_case(cupy, kernels, timer, rng, *CASES[i]))
        cupy.get_default_memory_pool().free_all_blocks()
    for row in rows:
        for key in ("v1", "v2", "sdpa"):
            if row.get(f"{key}_us"):
                row[f"{key}_GBps"] = row["kv_bytes"] / row[f"{key}_us"] / 1e3
                row[f"{key}_pct"] = 100 * row[f"{key}_GBps"] / ceiling
    result["cases"] = rows

    table = Table(title=f"paged decode attention, {gpu}: read ceiling {ceiling:.0f} GB/s, "
                        f"copy {result['copy_GBps']:.0f} GB/s (float16, head_dim 128, block 16, shuffled)")
    for col in ("batch x ctx", "heads q/kv", "KV MB", "v1 us", "v2 us", "v2 GB/s", "v2 %", "target %",
                "sdpa us", "sdpa %", "v2 plain us", "v2 s6 us", "v2 t8192 us", "splits"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['batch']} x {r['context']}", f"{r['num_qo_heads']}/{r['num_kv_heads']}",
                      f"{r['kv_bytes'] / 1e6:.0f}", f"{r['v1_us']:.0f}", f"{r['v2_us']:.1f}",
                      f"{r['v2_GBps']:.0f}", f"{r['v2_pct']:.1f}", f">= {r['target_pct']}",
                      "-" if r["sdpa_us"] is None else f"{r['sdpa_us']:.1f}",
                      "-" if r["sdpa_us"] is None else f"{r['sdpa_pct']:.1f}",
                      f"{r['v2_plain_us']:.1f}", f"{r['v2_s6_us']:.1f}", f"{r['v2_t8192_us']:.1f}",
                      str(r["v2_partitions"]))
    Console(width=200).print(table)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"kernel_bench_{re.sub(r'[^A-Za-z0-9]+', '_', gpu).strip('_')}_{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    if args.plot:
        from . import plots

        print(f"wrote {plots.kernel_bandwidth(result, args.plot)}")
    return result


if __name__ == "__main__":
    main()
