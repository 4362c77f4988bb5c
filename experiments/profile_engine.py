"""profile_engine: where a continuous-batching run spends its host time (cProfile) and its prefill steps.

Runs the throughput experiment's workload in one mode under ``cProfile``, times every prefill forward
(host wall clock with the device synchronised before and after) and prints the functions with the most
cumulative time. A diagnostic, not a benchmark: profiling slows the host down.

    python -m experiments.profile_engine --device gpu --workload w1 --mode continuous --kv-cache-memory-bytes 512MiB
"""
from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import numpy as np

from . import cli, throughput


def _timed_prefill(engine, log: list):
    """Wrap the model's prefill forwards (``model.prefill`` and, on a GPU, ``model.decode`` of a prefill-layout
    batch, as the model runner issues them) with device-synchronised timers; graph replays are not timed."""
    prefill, decode, xp = engine.model.prefill, engine.model.decode, engine.backend.xp

    def timed(forward, batch, kv_cache, num_seqs, num_tokens):
        sync = engine.backend.is_gpu
        if sync and xp.cuda.get_current_stream().is_capturing():
            return forward(batch, kv_cache)  # NOTE: a CUDA graph being captured: no sync allowed
        if sync:
            xp.cuda.get_current_stream().synchronize()
        start = time.perf_counter()
        out = forward(batch, kv_cache)
        if sync:
            xp.cuda.get_current_stream().synchronize()
        log.append((num_seqs, num_tokens, time.perf_counter() - start))
        return out

    def timed_prefill(batch, kv_cache):
        return timed(prefill, batch, kv_cache, len(batch.seq_lens), int(sum(batch.seq_lens)))

    def timed_decode(batch, kv_cache):
        if batch.query_start_loc is None:
            return decode(batch, kv_cache)
        return timed(decode, batch, kv_cache, int(batch.query_start_loc.shape[0]) - 1, int(batch.token_ids.shape[0]))
    engine.model.prefill, engine.model.decode = timed_prefill, timed_decode


def parse_args(argv=None):
    from pagedkv.model.config import PRESETS

    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="w1", choices=throughput.WORKLOADS, help="request lengths (default w1)")
    p.add_argument("--mode", default="continuous", choices=throughput.MODES, help="scheduling (default continuous)")
    p.add_argument("--model", default="auto", choices=("auto", *PRESETS),
                   help="random-weight model preset (default: llama-1b on GPU, tiny on CPU)")
    p.add_argument("--num-prompts", dest="num_requests", metavar="N", type=int, default=None,
                   help="requests (default 128 on a GPU, 32 on the CPU)")
    cli.add_engine_flags(p, pool_default="512MiB")
    p.add_argument("--top", type=int, default=30, help="functions listed, by cumulative time (default 30)")
    cli.add_common(p, plot=False)
    args = p.parse_args(argv)
    cli.check_common(args)
    cli.check_engine_flags(args)
    cli.in_range("--top", args.top, 1, 10000)
    return args


def _throughput_args(args, backend):
    """The throughput experiment's namespace for the same run (its checks, defaults and memory estimate)."""
    num_requests = args.num_requests or (128 if backend.is_gpu else 32)
    pool = (["--num-gpu-blocks-override", str(args.num_gpu_blocks_override)] if args.num_gpu_blocks_override else
            ["--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes or 512 << 20)])
    if args.gpu_memory_utilization is not None:
        raise cli.FlagError("--gpu-memory-utilization: profile with a fixed pool (--kv-cache-memory-bytes)")
    ns = throughput.parse_args(["--device", backend.name, "--workload", args.workload, "--num-prompts",
                                str(num_requests), *pool, *(["--enforce-eager"] if args.enforce_eager else []),
                                "--kv-cache-dtype", args.kv_cache_dtype, "--model", args.model,
                                "--dtype", args.dtype, "--seed", str(args.seed)])
    return ns, throughput.resolve(ns, backend)


def _top_functions(profiler, top: int) -> list[dict]:
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)[:top]
    return [{"function": f"{file}:{line}({name})", "calls": nc, "total_s": tt, "cumulative_s": ct}
            for (file, line, name), (cc, nc, tt, ct, _) in rows]


@cli.guarded
def main(argv=None) -> int:
    from pagedkv.engine import LLMEngine, SamplingParams

    args = parse_args(argv)
    backend = cli.resolve_backend(args.device)
    ns, workload = _throughput_args(args, backend)
    engine = LLMEngine(throughput.engine_config(args.mode, ns, workload))
    throughput._warm_up(engine, SamplingParams)
    log: list = []
    _timed_prefill(engine, log)
    for prompt, m in zip(workload.prompts, workload.max_tokens):
        engine.add_request(list(prompt), SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    while engine.has_unfinished_requests():
        engine.step()
    profiler.disable()
    wall = time.perf_counter() - start
    seqs, tokens, secs = np.array(log, dtype=np.float64).reshape(-1, 3).T
    timed = (f"per forward median {1e3 * np.median(secs):.2f} ms, {np.median(seqs):.0f} sequences, "
             f"{np.median(tokens):.0f} tokens") if log else "all replayed as CUDA graphs (not timed)"
    print(f"{args.workload} {args.mode}, {ns.model} {ns.dtype} on {backend.name}: {engine.totals.num_steps} steps in "
          f"{wall:.2f} s (profiled); {len(log)} prefill forwards, {int(tokens.sum())} tokens, {secs.sum():.2f} s: "
          f"{timed}")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.top)
    print(out.getvalue())
    if args.json:
        payload = {"experiment": "profile_engine", "run": cli.run_info(backend), "config": vars(ns),
                   "workload": workload.summary(), "num_steps": engine.totals.num_steps, "wall_s": wall,
                   "prefill_forwards": [{"num_seqs": int(a), "num_tokens": int(b), "seconds": float(c)}
                                        for a, b, c in log],
                   "top_functions": _top_functions(profiler, args.top)}
        print(f"wrote {cli.write_json(args.json, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
