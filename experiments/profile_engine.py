"""profile_engine: where a continuous-batching run spends its host time (cProfile) and its prefill steps.

Runs the throughput experiment's workload in one mode under ``cProfile``, times every prefill forward
(host wall clock with the device synchronised before and after) and prints the functions with the most
cumulative time. A diagnostic, not a benchmark: profiling slows the host down.

    python -m experiments.profile_engine --device gpu --workload w1 --mode continuous --kv-budget-mb 512
"""
from __future__ import annotations

import cProfile
import io
import pstats
import time

import numpy as np

from . import cli, throughput


def _timed_prefill(engine, log: list):
    prefill, xp = engine.model.prefill, engine.backend.xp

    def wrapper(batch, kv_cache):
        sync = engine.backend.is_gpu
        if sync:
            xp.cuda.get_current_stream().synchronize()
        start = time.perf_counter()
        out = prefill(batch, kv_cache)
        if sync:
            xp.cuda.get_current_stream().synchronize()
        log.append((len(batch.seq_lens), int(sum(batch.seq_lens)), time.perf_counter() - start))
        return out
    return wrapper


@cli.guarded
def main(argv=None) -> int:
    from pagedkv.engine import LLMEngine, SamplingParams

    p = cli.Parser(prog="python -m experiments.profile_engine", description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="w1")
    p.add_argument("--mode", default="continuous")
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--kv-budget-mb", type=float, default=512)
    p.add_argument("--top", type=int, default=30)
    cli.add_common(p, dtype="float16")
    args = p.parse_args(argv)
    cli.in_choices("--workload", args.workload, throughput.WORKLOADS)
    cli.in_choices("--mode", args.mode, throughput.MODES)
    backend = cli.resolve_backend(args.device)
    ns = throughput.parse_args(["--device", backend.name, "--workload", args.workload, "--num-requests",
                                str(args.num_requests), "--kv-budget-mb", str(args.kv_budget_mb), "--cuda-graph",
                                "on" if backend.is_gpu else "off"])
    workload = throughput.resolve(ns, backend)
    engine = LLMEngine(throughput.engine_config(args.mode, ns, workload))
    throughput._warm_up(engine, SamplingParams)
    log: list = []
    engine.model.prefill = _timed_prefill(engine, log)
    for prompt, m in zip(workload.prompts, workload.max_tokens):
        engine.add_request(list(prompt), SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    while engine.has_unfinished_requests():
        engine.step()
    profiler.disable()
    wall = time.perf_counter() - start
    seqs, tokens, secs = (np.array(x) for x in zip(*log))
    print(f"{args.workload} {args.mode}: {engine.totals.num_steps} steps in {wall:.2f} s (profiled); "
          f"{len(log)} prefill forwards, {int(tokens.sum())} tokens, {secs.sum():.2f} s: per forward "
          f"median {1e3 * np.median(secs):.2f} ms, {np.median(seqs):.0f} sequences, {np.median(tokens):.0f} tokens")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.top)
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    main()
