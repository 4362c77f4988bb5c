"""The CPU path as a demo sees it: ``LLM(model).generate("Hello")`` — build time, time to the first token and
decode tokens per second — with the CPU matmul in float32 BLAS (``LLM``'s default) and in float64 (the engine's
batch-invariant oracle, what ``LLM`` used before), measured in one run on this machine.

    python -m experiments.cpu_demo                                   # the "small" preset, both matmuls
    python -m experiments.cpu_demo --model llama-1b --max-tokens 8 --host-matmul float32 float64

Time to first token: from ``stream()`` being called to its first text delta (tokenize, prefill, one sample);
tokens/s: the decode tokens after the first over the time after the first (``ignore_eos``, greedy). A preset
without a tokenizer (``llama-1b``) gets token ids through ``generate`` and is timed by the request's metrics
(its CPU column is then all tokens over the whole call's CPU time). The median
of ``--runs`` runs after one warm-up. Prints a table; writes JSON only with ``--output-json``.
"""
from __future__ import annotations

import statistics
import time

from . import cli

MODELS = ("small", "tiny", "llama-1b")
MATMULS = ("float32", "float64")


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="small", help="preset (random weights; default small)")
    p.add_argument("--host-matmul", nargs="+", choices=MATMULS, default=list(MATMULS),
                   help="CPU matmuls to measure (default both)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per run (default 64)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per matmul after one warm-up (default 3)")
    p.add_argument("--prompt", default="Hello", help="the prompt (default 'Hello')")
    p.add_argument("--output-json", default=None, help="write the results here")
    args = p.parse_args(argv)
    cli.in_range("--max-tokens", args.max_tokens, 2, 4096)
    cli.in_range("--runs", args.runs, 1, 100)
    cli.check_output_path(args.output_json, "--output-json")
    return args


def measure(llm, prompt: str, max_tokens: int) -> tuple[float, float, float, float]:
    """Of one greedy stream: seconds to the first text delta and decode tokens/s after it, in wall-clock time
    and in this process's CPU time (the latter is what a loaded machine does not inflate)."""
    from pagedkv import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    if llm.get_tokenizer() is None:  # token ids in; the request's own timestamps
        cpu_start = time.process_time()
        m = llm.generate([[1] + [100 + i for i in range(len(prompt))]], params, use_tqdm=False)[0].metrics
        cpu = time.process_time() - cpu_start
        decode_s = m.last_token_time - m.first_token_time
        return (m.first_token_time - m.arrival_time, (max_tokens - 1) / decode_s, float("nan"),
                max_tokens / max(cpu, 1e-9))
    start, cpu_start = time.perf_counter(), time.process_time()
    first = cpu_first = None
    for _ in llm.stream(prompt, params):
        if first is None:
            first, cpu_first = time.perf_counter(), time.process_time()
    end, cpu_end = time.perf_counter(), time.process_time()
    return (first - start, (max_tokens - 1) / (end - first), cpu_first - cpu_start,
            (max_tokens - 1) / max(cpu_end - cpu_first, 1e-9))


def tokenizer_for(model: str):
    """The preset's tokenizer, or None (then the prompt goes in as token ids, one per character)."""
    from pagedkv.text.presets import preset_tokenizer

    return preset_tokenizer(model)


def _load_average() -> float | None:
    import os

    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


@cli.guarded
def main(argv=None) -> int:
    args = parse_args(argv)
    cli.require_module("tokenizers", "text")
    from rich.table import Table

    from pagedkv import LLM

    tokenizer = tokenizer_for(args.model)
    rows = []
    for kind in args.host_matmul:
        t0 = time.perf_counter()
        llm = LLM(args.model, tokenizer=tokenizer, device="cpu", host_matmul=kind, max_model_len=1024,
                  num_blocks=128)
        build_s = time.perf_counter() - t0
        measure(llm, args.prompt, 2)  # warm-up (first calls allocate)
        runs = [measure(llm, args.prompt, args.max_tokens) for _ in range(args.runs)]
        rows.append({"host_matmul": kind, "build_s": build_s,
                     "ttft_s": statistics.median(r[0] for r in runs),
                     "decode_tokens_per_s": statistics.median(r[1] for r in runs),
                     "ttft_cpu_s": statistics.median(r[2] for r in runs),
                     "decode_tokens_per_cpu_s": statistics.median(r[3] for r in runs)})
        del llm
    table = Table(title=f"LLM({args.model!r}) on the CPU: {args.max_tokens} tokens, median of {args.runs}")
    for col in ("host matmul", "build s", "first token s", "decode tokens/s", "first token CPU s",
                "decode tokens/CPU s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["host_matmul"], f"{r['build_s']:.2f}", f"{r['ttft_s']:.3f}", f"{r['decode_tokens_per_s']:.1f}",
                      f"{r['ttft_cpu_s']:.3f}", f"{r['decode_tokens_per_cpu_s']:.1f}")
    cli.console().print(table)
    load = _load_average()
    if load is not None:
        print(f"load average (1 min) {load:.1f} on {_cpus()} CPUs: wall-clock figures are inflated when it exceeds them")
    if args.output_json:
        cli.write_json(args.output_json, {"model": args.model, "max_tokens": args.max_tokens, "runs": args.runs,
                                          "prompt": args.prompt, "results": rows, "load_average": _load_average(),
                                          "info": cli.run_info(cli.resolve_backend("cpu"))})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
