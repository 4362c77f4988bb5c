"""structured_bench: decode throughput with a JSON schema against the same requests without one, and the per-token
mask time of llguidance and xgrammar on the same token walks.

Engine run (``--device gpu``: llama-1b float16, random weights; CPU: the tiny model): a byte-level BPE tokenizer
trained on the spot with the model's vocabulary size (synthetic merges fill it: 128,256 ids for llama-1b); N
requests (default 32) of 64 random prompt tokens, 256 output tokens each (CPU: 4 requests of 24 tokens;
``ignore_eos``: every run produces the same number of tokens; after the object closes the grammar allows EOS
only), temperature 0.8, seeded per request.
``schema`` and ``plain`` runs on one engine, each after a warm-up of the same kind; output tokens/s = tokens /
wall. ``mask_fill_ms_per_step``: the host's bitmask time per step (llguidance, parallel over the rows).

Libraries (``--libs``): a random walk of allowed tokens through the schema (llguidance's masks), then for each
library the median time of one ``fill_next_token_bitmask`` along that walk (one row, one thread). xgrammar needs
torch; where it is missing the row says so.

    python -m experiments.structured_bench --device gpu --output-json structured.json
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import numpy as np

from . import cli
from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams, StructuredOutputsParams
from pagedkv.model import get_config

SCHEMA = {"type": "object", "properties": {  # NOTE: no maxLength: it makes llguidance's masks ~15x slower
    "name": {"type": "string"}, "age": {"type": "integer"}, "pet": {"enum": ["cat", "dog", "fox"]},
    "tags": {"type": "array", "items": {"type": "string"}}, "ok": {"type": "boolean"}},
    "required": ["name", "age", "pet", "tags", "ok"], "additionalProperties": False}
PROMPT_LEN, OUTPUT_LEN, WALK = 64, 256, 200
CPU_NUM_REQUESTS, CPU_OUTPUT_LEN = 4, 24  # the CPU smoke run (NumPy forward): seconds


def make_engine(args, tokenizer) -> LLMEngine:
    gpu = args.device == "gpu"
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, block_size=16,
                          max_num_seqs=max(args.num_requests, 8), max_model_len=PROMPT_LEN + args.output_len + 16,
                          max_num_batched_tokens=4096, seed=args.seed, cuda_graph=gpu,
                          num_blocks=None if gpu else 1024, eos_token_id=tokenizer.eos_token_id)
    return LLMEngine(config, tokenizer=tokenizer)


def run(engine: LLMEngine, prompts, structured: bool, output_len: int) -> dict:
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True) if structured else None
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=output_len, ignore_eos=True, structured_outputs=so)
              for i in range(len(prompts))]
    engine.generate(prompts[:4], params[:4], progress=False)  # warm-up (allocates the mask buffers)
    engine.warmup_graphs()
    fill = _timed_fill(engine)
    sync(engine)
    steps0, start = engine.totals.num_steps, time.perf_counter()
    outs = engine.generate(prompts, params, progress=False)
    sync(engine)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = engine.totals.num_steps - steps0
    result = {"wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall, "steps": steps,
              "mask_fill_ms_per_step": 1e3 * fill[0] / steps if structured else None}
    if structured:
        texts = [o.outputs[0].text for o in outs]
        result["parsed"] = sum(_parses(t) for t in texts)
        result["example"] = texts[0][:160]
    return result


def _parses(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _timed_fill(engine) -> list:
    total = [0.0]
    grammars = engine.runner.grammars
    if grammars is None:
        return total
    real = grammars.fill

    def fill(rows, bitmask):
        t0 = time.perf_counter()
        real(rows, bitmask)
        total[0] += time.perf_counter() - t0

    grammars.fill = fill
    return total


def sync(engine) -> None:
    if engine.backend.is_gpu:
        engine.backend.xp.cuda.get_current_stream().synchronize()


def library_masks(tokenizer, vocab: int, seed: int) -> dict:
    """Median µs of one mask fill along one random walk through SCHEMA, llguidance and xgrammar."""
    import llguidance
    import llguidance.numpy as lln

    ll = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab, eos_token=tokenizer.eos_token_id)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    matcher, mask = llguidance.LLMatcher(ll, grammar), lln.allocate_token_bitmask(1, vocab)
    rng, walk, times = np.random.default_rng(seed), [], []
    for _ in range(WALK):
        t0 = time.perf_counter()
        lln.fill_next_token_bitmask(matcher, mask, 0)
        times.append(time.perf_counter() - t0)
        allowed = np.flatnonzero(np.unpackbits(mask[0].view(np.uint8), bitorder="little")[:vocab])
        allowed = allowed[allowed != tokenizer.eos_token_id] if allowed.size > 1 else allowed
        token = int(rng.choice(allowed))
        if token == tokenizer.eos_token_id or not matcher.consume_token(token):
            break
        walk.append(token)
    out = {"walk_tokens": len(walk), "llguidance_us": 1e6 * statistics.median(times)}
    try:
        out["xgrammar_us"], out["xgrammar_tokens"] = _xgrammar(tokenizer, vocab, walk)
    except Exception as exc:  # NOTE: a missing torch/xgrammar is a result here, not a failure
        out["xgrammar_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def _xgrammar(tokenizer, vocab: int, walk: list) -> tuple:
    import xgrammar as xgr

    pieces = sorted(tokenizer.backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    encoded = [""] * vocab
    for piece, i in pieces:
        if i < vocab:
            encoded[i] = piece
    info = xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=vocab,
                             stop_token_ids=[tokenizer.eos_token_id])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    matcher, mask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, vocab)
    times, done = [], 0
    for token in walk:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        times.append(time.perf_counter() - t0)
        if not matcher.accept_token(token):
            break
        done += 1
    return 1e6 * statistics.median(times), done


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0])
    from pagedkv.model.config import PRESETS

    p.add_argument("--model", default="auto", choices=("auto", *PRESETS),
                   help="random-weight model preset (default: llama-1b on a GPU, tiny with vocab 512 on the CPU)")
    p.add_argument("--num-prompts", dest="num_requests", type=int, default=None,
                   help=f"requests (default 32 on a GPU, {CPU_NUM_REQUESTS} on the CPU)")
    p.add_argument("--libs", action="store_true", help="also time llguidance's and xgrammar's masks")
    cli.add_common(p, plot=False)
    args = p.parse_args(argv)
    cli.check_common(args)
    if args.num_requests is not None:
        cli.in_range("--num-prompts", args.num_requests, 1, 512)
    return args


@cli.guarded
def main(argv=None) -> int:
    from pagedkv.text.train import train_tokenizer

    args = parse_args(argv)
    backend = cli.resolve_backend(args.device)
    args.device = backend.name
    args.model = args.model if args.model != "auto" else ("llama-1b" if backend.is_gpu else "tiny")
    args.dtype = args.dtype if args.dtype != "auto" else ("float16" if backend.is_gpu else "float32")
    args.num_requests = args.num_requests or (32 if backend.is_gpu else CPU_NUM_REQUESTS)
    args.output_len = OUTPUT_LEN if backend.is_gpu else CPU_OUTPUT_LEN
    vocab = get_config(args.model).vocab_size
    if not backend.is_gpu and vocab < 512:
        args.model, vocab = get_config("tiny", vocab_size=512), 512
    with tempfile.TemporaryDirectory(prefix="structured_bench_") as folder:
        tokenizer = train_tokenizer(folder, vocab)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(0, vocab, PROMPT_LEN).tolist() for _ in range(args.num_requests)]
    engine = make_engine(args, tokenizer)
    runs = {name: run(engine, prompts, name == "schema", args.output_len) for name in ("plain", "schema")}
    runs["schema"]["over_plain"] = runs["schema"]["tokens_per_s"] / runs["plain"]["tokens_per_s"]
    results = {"info": cli.run_info(backend), "workload": {"model": str(getattr(args.model, "name", args.model)),
               "dtype": args.dtype, "num_requests": args.num_requests, "prompt_len": PROMPT_LEN,
               "output_len": args.output_len, "vocab": vocab, "schema": SCHEMA}, "runs": runs}
    if args.libs:
        results["libraries"] = library_masks(tokenizer, vocab, args.seed)
    _print(results)
    if args.json:
        print(f"wrote {cli.write_json(args.json, results)}")
    return 0


def _print(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"structured_bench — {results['info'].get('device', '')}")
    for col in ("run", "tokens/s", "wall s", "steps", "mask ms/step", "parsed", "÷ plain"):
        table.add_column(col, justify="right")
    for name, r in results["runs"].items():
        table.add_row(name, f"{r['tokens_per_s']:,.0f}", f"{r['wall_s']:.2f}", str(r["steps"]),
                      "-" if r["mask_fill_ms_per_step"] is None else f"{r['mask_fill_ms_per_step']:.3f}",
                      str(r.get("parsed", "-")), f"{r.get('over_plain', 1.0):.3f}")
    Console(width=140).print(table)
    if "libraries" in results:
        print("libraries:", json.dumps(results["libraries"]))


if __name__ == "__main__":
    sys.exit(main())
