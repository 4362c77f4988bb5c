"""sampler_bench: the device sampler against ``cupy.argmax`` (the greedy floor), per configuration and batch.

B in {1, 32, 128, 256} x V = 128,256 float16 logits; "llm" logits = 2.5 N(0, 1) with 10 tokens a row raised by
U(5, 15), "flat" = N(0, 1). CUDA events, 256 MiB written between calls so the logits come from memory (not L2),
the median of 50 calls after 5 warm-ups.

    python -m experiments.sampler_bench --output-json sampler_bench.json        (GPU)
"""
from __future__ import annotations

import sys

import numpy as np

from . import cli

VOCAB, BATCHES, REPS, WARMUP = 128256, (1, 32, 128, 256), 50, 5
CONFIGS = {  # name: (SamplingParams keyword arguments, logits kind)
    "greedy (T=0)": (dict(temperature=0.0), "llm"),
    "T=1": (dict(temperature=1.0), "llm"),
    "T=0.8 top_p=0.95": (dict(temperature=0.8, top_p=0.95), "llm"),
    "T=0.7 top_k=50": (dict(temperature=0.7, top_k=50), "llm"),
    "T=1 min_p=0.05": (dict(temperature=1.0, min_p=0.05), "llm"),
    "T=0.6 top_k=50 top_p=0.9": (dict(temperature=0.6, top_k=50, top_p=0.9), "llm"),
    "flat T=1 top_p=0.95": (dict(temperature=1.0, top_p=0.95), "flat"),
}


def make_logits(cupy, rng, batch: int, kind: str):
    x = rng.normal(size=(batch, VOCAB)).astype(np.float32)
    if kind == "llm":
        x *= 2.5
        for row in x:
            row[rng.integers(VOCAB, size=10)] += rng.uniform(5, 15, size=10)
    return cupy.asarray(x.astype(np.float16))


def median_us(cupy, fn, flush) -> float:
    times = []
    for i in range(WARMUP + REPS):
        flush.fill(i)  # NOTE: 256 MiB written between calls: the logits come from memory, not L2
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= WARMUP:
            times.append(cupy.cuda.get_elapsed_time(start, end) * 1e3)
    return float(np.median(times))


def run(cupy, seed: int) -> list[dict]:
    from pagedkv.engine import SamplingParams
    from pagedkv.engine.runner.sampler import SamplingTensors, sample

    rng = np.random.default_rng(seed)
    flush = cupy.empty(64 * 2**20, dtype=cupy.float32)
    results = []
    for batch in BATCHES:
        x = {kind: make_logits(cupy, rng, batch, kind) for kind in ("llm", "flat")}
        out = cupy.empty(batch, dtype=cupy.int32)
        floor = median_us(cupy, lambda: cupy.argmax(x["llm"], axis=1), flush)
        results.append({"batch": batch, "config": "cupy.argmax", "us": floor, "x_argmax": 1.0})
        for name, (kwargs, kind) in CONFIGS.items():
            t = SamplingTensors.from_rows([(SamplingParams(**kwargs), 1234 + i, 7) for i in range(batch)], cupy)
            us = median_us(cupy, lambda: sample(x[kind], t, out=out), flush)
            results.append({"batch": batch, "config": name, "us": us, "x_argmax": us / floor})
    return results


def render(results: list[dict], device: str):
    from rich.table import Table

    table = Table(title=f"sample() vs cupy.argmax, V={VOCAB} float16, {device} (median of {REPS}, L2 flushed)")
    table.add_column("config")
    for batch in BATCHES:
        table.add_column(f"B={batch} us", justify="right")
        table.add_column("x argmax", justify="right")
    for name in ["cupy.argmax", *CONFIGS]:
        cells = [r for r in results if r["config"] == name]
        table.add_row(name, *[v for r in cells for v in (f"{r['us']:.1f}", f"{r['x_argmax']:.2f}")])
    return table


@cli.guarded
def main(argv=None) -> int:
    p = cli.Parser(description=__doc__.splitlines()[0])
    cli.add_common(p, auto_dtype="float16", plot=False)
    args = p.parse_args(argv)
    cli.check_common(args)
    backend = cli.resolve_backend(args.device)
    if not backend.is_gpu:
        raise cli.FlagError("sampler_bench times the device sampler: it needs a GPU")
    results = run(backend.xp, args.seed)
    info = cli.run_info(backend)
    cli.console().print(render(results, info["device"]))
    if args.json:
        print(f"wrote {cli.write_json(args.json, {'info': info, 'vocab': VOCAB, 'reps': REPS, 'results': results})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
