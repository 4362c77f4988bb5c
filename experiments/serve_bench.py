"""serve_bench: requests with Poisson arrivals against the server (HTTP) or the engine in-process, the way
vLLM's ``benchmark_serving`` measures a server.

Each request is ``--random-input-len`` random token ids (lengths uniform within ``--random-range-ratio``) asking
for ``--random-output-len`` tokens with ``ignore_eos`` (so every request produces exactly what it asked for).
Requests leave at exponential gaps of mean ``1 / rate`` (``inf``: all at once); every one streams.

    TTFT    time to first token: request sent -> first streamed text (HTTP) / first token (in-process)
    ITL     inter-token latency: gaps between successive streamed chunks (one token each while streaming)
    TPOT    time per output token after the first: (latency - TTFT) / (output tokens - 1)
    throughput  completed requests / duration, output tokens / duration; duration = first send -> last reply

    python -m pagedkv.serve --model DIR &                               # then:
    python -m experiments.serve_bench --base-url http://127.0.0.1:8000 --request-rate 1 4 inf
    python -m experiments.serve_bench                                   # in-process: the engine loop, no HTTP
                                                                        # (llama-1b on a GPU; tiny, small on a CPU)
"""
from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import cli

PERCENTILES = (50, 90, 99)


IN_PROCESS_ONLY = ("tokenizer", "device", "dtype", "max_model_len", "enforce_eager")
CPU_SIZES = {"num_prompts": 16, "random_input_len": 32, "random_output_len": 16}  # a bare CPU run: seconds
GPU_SIZES = {"num_prompts": 200, "random_input_len": 256, "random_output_len": 128}


def parse_args(argv):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=None, help="a running OpenAI-compatible server, e.g. http://127.0.0.1:8000 "
                   "(default: none; the engine runs in this process behind its engine loop, without HTTP)")
    p.add_argument("--model", default=None, help="with --base-url: the served model id (default: the server's "
                   "first); in-process: a checkpoint folder or a preset (default llama-1b on a GPU, tiny on a CPU)")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per arrival rate (default 200; CPU 16)")
    p.add_argument("--request-rate", nargs="+", default=["inf"], help="requests per second, one run each; inf: all "
                   "at once (default inf)")
    p.add_argument("--random-input-len", type=int, default=None, help="prompt tokens (default 256; CPU 32)")
    p.add_argument("--random-output-len", type=int, default=None, help="output tokens (default 128; CPU 16)")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)] (default 0: fixed)")
    p.add_argument("--vocab-size", type=int, default=None, help="token ids are drawn in [0, this) (default: the "
                   "model's; with --base-url: the server's /v1/models card)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    p.add_argument("--seed", type=int, default=0, help="prompts and arrival times (default 0)")
    p.add_argument("--output-json", default=None, metavar="PATH", help="also write the results here")
    local = p.add_argument_group("in-process runs (no --base-url)")
    local.add_argument("--tokenizer", default=None, help="a folder with tokenizer.json (not needed: prompts are ids)")
    local.add_argument("--device", default=None, choices=cli.DEVICES, help="where to run (default auto)")
    local.add_argument("--dtype", default=None, choices=("auto",) + cli.DTYPES,
                       help="weights and K/V (default auto: a checkpoint's; presets float16 on a GPU, float32 on a "
                            "CPU)")
    local.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: the "
                       "engine's)")
    local.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    args = p.parse_args(argv)
    check(args)
    return args


def check(args) -> None:
    """Every flag checked before any work (one ``error:`` line, exit code 2); in-process defaults resolved."""
    rates = []
    for r in args.request_rate:
        try:
            rates.append(float(r))
        except ValueError:
            raise cli.FlagError(f"--request-rate values must be numbers or inf, got {r}") from None
        if not rates[-1] > 0:
            raise cli.FlagError(f"--request-rate values must be > 0, got {r}")
    args.request_rate = rates
    if args.base_url is not None:
        given = [f"--{n.replace('_', '-')}" for n in IN_PROCESS_ONLY if getattr(args, n) not in (None, False)]
        if given:
            raise cli.FlagError(f"{given[0]} is for in-process runs; the server at --base-url has its own")
        if not args.base_url.startswith(("http://", "https://")):
            raise cli.FlagError(f"--base-url must start with http:// or https://, got {args.base_url}")
        gpu = True
    else:
        args.device = cli.in_choices("--device", args.device or "auto", cli.DEVICES)
        args.dtype = None if args.dtype == "auto" else args.dtype
        gpu = cli.resolve_backend(args.device).is_gpu
        args.model = args.model or ("llama-1b" if gpu else "tiny")
    for name, default in (GPU_SIZES if gpu else CPU_SIZES).items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    cli.in_range("--num-prompts", args.num_prompts, 1, 100_000)
    cli.in_range("--random-input-len", args.random_input_len, 1, 1 << 20)
    cli.in_range("--random-output-len", args.random_output_len, 1, 1 << 20)
    cli.in_range("--random-range-ratio", args.random_range_ratio, 0.0, 0.99)
    cli.in_range("--seed", args.seed, 0, 2**32 - 1)
    for flag, value in (("--max-concurrency", args.max_concurrency), ("--vocab-size", args.vocab_size),
                        ("--max-model-len", args.max_model_len)):
        if value is not None:
            cli.in_range(flag, value, 1, 1 << 24)


# ------------------------------------------------------------------------------------------- workload
def make_requests(args, vocab_size: int, seed_offset: int = 0):
    """(prompt ids, output length) per request, and each request's send time after the start (seconds)."""
    rng = np.random.default_rng(args.seed + seed_offset)
    lens = []
    for base in (args.random_input_len, args.random_output_len):
        lo, hi = max(1, int(base * (1 - args.random_range_ratio))), max(1, int(base * (1 + args.random_range_ratio)))
        lens.append(rng.integers(lo, hi + 1, args.num_prompts))
    prompts = [rng.integers(0, vocab_size, int(n)).tolist() for n in lens[0]]
    return list(zip(prompts, (int(n) for n in lens[1])))


def arrival_times(rate: float, n: int, seed: int) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])]).tolist()


@dataclass(slots=True)
class RequestResult:
    prompt_len: int
    output_len: int = 0
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str | None = None


# -------------------------------------------------------------------------------------------- clients
async def http_request(client, url: str, model: str, prompt, max_tokens: int) -> RequestResult:
    import json

    result = RequestResult(len(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0.0, "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
    except Exception as exc:  # NOTE: a failed request is counted, not fatal: the run goes on
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency = time.perf_counter() - start
    return result


async def engine_request(loop, prompt, max_tokens: int) -> RequestResult:
    """One request through the engine loop. Times are the engine's own (``RequestOutput.metrics``, stamped when
    each step produced its token), so they do not depend on when this coroutine got to read them."""
    from pagedkv.engine import SamplingParams

    result = RequestResult(len(prompt))
    start = last = time.perf_counter()
    sink = await loop.submit([prompt], [SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)])
    finished = False
    while not finished:
        for index, item in await sink.get_all():
            if index is None:
                result.error, finished = str(item), True
                break
            n, t = len(item.outputs[0].token_ids), item.metrics.last_token_time
            if n > result.output_len and t is not None:
                if result.ttft is None:
                    result.ttft = t - start
                else:
                    result.itl.extend([(t - last) / (n - result.output_len)] * (n - result.output_len))
                result.output_len, last = n, t
            finished = item.finished
    result.latency = time.perf_counter() - start
    return result


async def run_rate(send, requests, rate: float, seed: int, max_concurrency: int | None):
    """Send every request at its arrival time; returns (results, duration from first send to last reply)."""
    limit = asyncio.Semaphore(max_concurrency or len(requests))
    times = arrival_times(rate, len(requests), seed)
    t0 = time.perf_counter()

    async def one(at, prompt, max_tokens):
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        async with limit:
            return await send(prompt, max_tokens)

    results = await asyncio.gather(*(one(at, p, m) for at, (p, m) in zip(times, requests)))
    return results, time.perf_counter() - t0


# -------------------------------------------------------------------------------------------- metrics
def _ms(xs: list[float]) -> dict:
    """Percentiles and mean of seconds, in milliseconds (None when there is nothing to measure)."""
    if not xs:
        return {**{f"p{q}": None for q in PERCENTILES}, "mean": None}
    return {**{f"p{q}": float(np.percentile(xs, q)) * 1e3 for q in PERCENTILES}, "mean": float(np.mean(xs)) * 1e3}


def summarize(results: list[RequestResult], duration: float, rate: float) -> dict:
    ok = [r for r in results if r.error is None]
    out_tokens = sum(r.output_len for r in ok)
    ms = _ms
    tpot = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.ttft is not None and r.output_len > 1]
    return {"request_rate": rate if math.isfinite(rate) else "inf", "num_requests": len(results),
            "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
            "total_input_tokens": sum(r.prompt_len for r in ok), "total_output_tokens": out_tokens,
            "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
            "ttft_ms": ms([r.ttft for r in ok if r.ttft is not None]), "itl_ms": ms([x for r in ok for x in r.itl]),
            "tpot_ms": ms(tpot), "e2el_ms": ms([r.latency for r in ok]),
            "errors": sorted({r.error for r in results if r.error})[:5]}


def render_table(rows: list[dict], title: str):
    from rich.table import Table

    t = Table(title=title)
    for name in ("rate (req/s)", "done", "duration s", "req/s", "out tok/s", "TTFT p50/p90/p99 ms",
                 "ITL p50/p90/p99 ms", "TPOT mean ms"):
        t.add_column(name, justify="right")
    fmt = lambda d: "/".join("-" if d[f"p{q}"] is None else f"{d[f'p{q}']:.1f}" for q in PERCENTILES)  # noqa
    for r in rows:
        t.add_row(str(r["request_rate"]), f"{r['completed']}/{r['num_requests']}", f"{r['duration_s']:.2f}",
                  f"{r['request_throughput']:.2f}", f"{r['output_throughput']:.1f}", fmt(r["ttft_ms"]),
                  fmt(r["itl_ms"]), "-" if r["tpot_ms"]["mean"] is None else f"{r['tpot_ms']['mean']:.2f}")
    return t


# ----------------------------------------------------------------------------------------------- main
async def http_target(args):
    """(send function, model id, vocab size, client to close) for a running server."""
    cli.require_module("httpx", "serve")
    import httpx

    client = httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=None))
    url = args.base_url.rstrip("/")
    try:
        response = await client.get(url + "/v1/models", timeout=10.0)
        response.raise_for_status()
        card = response.json()["data"][0]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        await client.aclose()
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise cli.FlagError(f"--base-url {args.base_url}: no OpenAI-compatible server answered GET /v1/models "
                            f"({why})") from None
    model = args.model or card["id"]
    vocab = args.vocab_size or card.get("vocab_size")
    if vocab is None:
        raise cli.FlagError("the server's /v1/models card has no vocab_size: pass --vocab-size")
    return (lambda prompt, n: http_request(client, url, model, prompt, n)), model, vocab, client


def in_process_target(args):
    from pagedkv.llm import LLM
    from pagedkv.model.config import PRESETS
    from pagedkv.serve import EngineLoop

    options = {"device": args.device, "cuda_graph": not args.enforce_eager}
    if args.dtype or args.model in PRESETS:  # NOTE: random weights default to float32: half on a GPU, as served
        options["dtype"] = args.dtype or ("float16" if cli.resolve_backend(args.device).is_gpu else "float32")
    if args.max_model_len:
        options["max_model_len"] = args.max_model_len
    llm = LLM(args.model, tokenizer=args.tokenizer, **options)
    loop = EngineLoop(llm.engine).start()
    return loop, args.vocab_size or llm.engine.model_config.vocab_size


async def bench(args) -> tuple[list[dict], str]:
    if args.base_url is None:
        loop, vocab = in_process_target(args)
        send, closer, target = (lambda prompt, n: engine_request(loop, prompt, n)), loop.shutdown, args.model
    else:
        send, model, vocab, client = await http_target(args)
        closer, target = None, f"{args.base_url} ({model})"
    try:
        rows = []
        for i, rate in enumerate(args.request_rate):
            requests = make_requests(args, vocab, seed_offset=i)
            results, duration = await run_rate(send, requests, rate, args.seed + i, args.max_concurrency)
            rows.append(summarize(results, duration, rate))
        return rows, target
    finally:
        if closer is not None:
            closer()
        else:
            await client.aclose()


@cli.guarded
def main(argv=None) -> int:
    args = parse_args(argv)
    rows, target = asyncio.run(bench(args))
    console = cli.console()
    console.print(render_table(rows, f"serve_bench: {target}, {args.num_prompts} requests per rate, "
                                     f"{args.random_input_len} in / {args.random_output_len} out tokens"))
    for r in rows:
        if r["errors"]:
            console.print(f"rate {r['request_rate']}: {r['failed']} failed, e.g. {r['errors'][0]}", soft_wrap=True)
    if args.output_json:
        config = {k: (v if not isinstance(v, list) else [x if math.isfinite(x) else "inf" for x in v])
                  for k, v in vars(args).items()}
        payload = {"experiment": "serve_bench", "target": target, "config": config, "results": rows,
                   "run": {"command": " ".join([cli.prog_name()] + (sys.argv[1:] if argv is None else argv)),
                           "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}
        console.print(f"wrote {cli.write_json(args.output_json, payload)}", soft_wrap=True)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
