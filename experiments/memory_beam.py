"""The beam-search scenario of ``experiments.memory_share``: KV blocks of beams that share vs beams that copy.

The same beam search (``pagedkv.beam.group.BeamGroup``, a tiny random Llama, ``ignore_eos`` so every
beam runs ``gen_len`` tokens) runs twice on one pool, per beam width:

    shared   children fork their parent (the prompt and every common generated block held once; copy-on-write
             of the shared partial last block only), a parent no child continues is freed at once
    copied   every child is a full copy of its parent (own blocks, K/V copied): each beam holds its own
             prompt + generated tokens, exactly (no over-reservation: the fairest no-sharing baseline)

The pool's used blocks (``BlockManager.num_used_blocks``) are read after the prefill and after every step;
peak and mean come from that timeline. Both runs must return the same beams, bit for bit (tokens and
cumulative log-probabilities), or the run fails.

    python -m experiments.memory_beam                                     # this scenario alone (CPU: seconds)
    python -m experiments.memory_share --beam-widths 2 4 8                # with memory_share's other scenarios
    python -m experiments.memory_beam --beam-prompt-len 19 --beam-gen-len 58 --beam-num-prompts 4   # Alpaca's means
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import cli
from .kv_shapes import LLAMA_1B, fmt_bytes

BEAM_WIDTHS = (2, 4, 8)
# NOTE: sizes default per device. On a GPU: a shared prompt of a few hundred tokens, 128 generated tokens, 4 prompts;
# on the CPU (every decode attention is the float64 reference) smaller, so that a bare run takes seconds. The
# PagedAttention paper's beam-search figure uses Alpaca (mean 19.31 prompt and 58.45 output tokens: Kwon et al.
# 2023, Fig. 11): --beam-prompt-len 19 --beam-gen-len 58.
GPU_DEFAULTS = {"beam_prompt_len": 400, "beam_gen_len": 128, "beam_num_prompts": 4}
CPU_DEFAULTS = {"beam_prompt_len": 200, "beam_gen_len": 32, "beam_num_prompts": 1}


@dataclass(frozen=True, slots=True)
class BeamScenario:
    beam_width: int
    num_prompts: int
    prompt_len: int
    gen_len: int


@dataclass(frozen=True, slots=True)
class BeamModeResult:
    mode: str
    peak_used_blocks: int
    mean_used_blocks: float
    num_cow_copies: int
    timeline_used_blocks: list


def add_flags(parser) -> None:
    """The scenario's flags on memory_share's parser."""
    parser.add_argument("--beam-widths", type=int, nargs="+", default=list(BEAM_WIDTHS), metavar="W",
                        help="beam widths of the beam-search scenario (default 2 4 8); 0 skips the scenario")
    size = lambda k: f"(default {GPU_DEFAULTS[k]} on a GPU, {CPU_DEFAULTS[k]} on the CPU)"  # noqa: E731
    parser.add_argument("--beam-prompt-len", type=int, default=None,
                        help=f"prompt tokens of each beam search {size('beam_prompt_len')}")
    parser.add_argument("--beam-gen-len", type=int, default=None,
                        help=f"tokens each beam generates {size('beam_gen_len')}")
    parser.add_argument("--beam-num-prompts", type=int, default=None,
                        help=f"prompts searched together {size('beam_num_prompts')}")


def check_flags(args, in_range) -> None:
    """``in_range(flag, value, lo, hi)`` raises the experiment's one-line error."""
    if args.beam_widths != [0]:
        for w in args.beam_widths:
            in_range("--beam-widths", w, 1, 64)
    for flag, lo, hi in (("--beam-prompt-len", 1, 8192), ("--beam-gen-len", 1, 1024), ("--beam-num-prompts", 1, 64)):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            in_range(flag, value, lo, hi)


def resolve(args, backend) -> None:
    """Fill the sizes left to their device default."""
    for key, value in (GPU_DEFAULTS if backend.is_gpu else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def scenarios(args) -> list[BeamScenario]:
    if args.beam_widths == [0]:
        return []
    return [BeamScenario(w, args.beam_num_prompts, args.beam_prompt_len, args.beam_gen_len)
            for w in args.beam_widths]


def run_beam_scenario(sc: BeamScenario, args, backend, report_bytes: int) -> dict:
    """Both modes on one engine's pool; returns the JSON-ready result (``report_bytes``: bytes per block of
    the reported shape)."""
    from pagedkv.beam.group import worst_case_blocks

    engine = _engine(sc, args, backend)
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, engine.model_config.vocab_size, (sc.num_prompts, sc.prompt_len)).tolist()
    runs = {mode: _run(engine, prompts, sc, share=mode == "shared") for mode in ("copied", "shared")}
    (copied, beams_c), (shared, beams_s) = runs["copied"], runs["shared"]
    bound = sc.num_prompts * worst_case_blocks(sc.prompt_len, sc.gen_len, sc.beam_width, args.block_size, True)
    return {"scenario": asdict(sc), "copied": asdict(copied), "shared": asdict(shared),
            "peak_saved_pct": 100.0 * (1 - shared.peak_used_blocks / copied.peak_used_blocks),
            "mean_saved_pct": 100.0 * (1 - shared.mean_used_blocks / copied.mean_used_blocks),
            "peak_bytes": {"copied": copied.peak_used_blocks * report_bytes,
                           "shared": shared.peak_used_blocks * report_bytes},
            "shared_worst_case_blocks": bound, "num_beams_compared": sum(len(b) for b in beams_s),
            "identical": beams_c == beams_s, "num_pool_blocks": engine.kv_cache.num_blocks}


def _engine(sc: BeamScenario, args, backend):
    """A tiny random Llama whose pool holds the copied mode's worst case."""
    from pagedkv.engine import EngineConfig, LLMEngine
    from pagedkv.beam.group import worst_case_blocks
    from pagedkv.model import get_config

    total = sc.prompt_len + sc.gen_len
    blocks = sc.num_prompts * worst_case_blocks(sc.prompt_len, sc.gen_len, sc.beam_width, args.block_size, False)
    config = get_config("tiny", max_position_embeddings=max(1024, total))
    dtype = args.dtype if backend.is_gpu else "float32"  # NOTE: NumPy has no fast float16 matmul
    return LLMEngine(EngineConfig(model=config, dtype=dtype, device=backend.name, seed=args.seed,
                                  block_size=args.block_size, num_blocks=blocks + blocks // 50 + 1,
                                  max_model_len=total, max_num_seqs=max(sc.num_prompts * sc.beam_width, 1)))


def _run(engine, prompts, sc: BeamScenario, share: bool):
    from pagedkv.beam.group import BeamGroup
    from pagedkv.beam.search import BeamSearchParams

    bm, cow = engine.manager, engine.manager.num_cow_copies
    params = BeamSearchParams(sc.beam_width, sc.gen_len, ignore_eos=True)
    search = BeamGroup(engine, prompts, params, frozenset(), share_blocks=share)
    timeline = []
    try:
        search.start()
        timeline.append(bm.num_used_blocks)
        while not search.done:
            search.step()
            timeline.append(bm.num_used_blocks)
    except BaseException:
        search.release()
        raise
    assert bm.num_used_blocks == 0, f"{bm.num_used_blocks} blocks still used after the search"
    # NOTE: the last entry (0: every beam finished) is not a step that holds memory
    held = timeline[:-1] or timeline
    result = BeamModeResult("shared" if share else "copied", max(held), float(np.mean(held)),
                            engine.manager.num_cow_copies - cow, timeline)
    beams = [[(b.token_ids, b.cum_logprob) for b in finished] for finished in search.finished]
    return result, beams


def verdict(r: dict, fmt_bytes) -> str:
    sc = r["scenario"]
    same = (f"beams identical ({r['num_beams_compared']} beams, tokens and log-probabilities bit for bit)"
            if r["identical"] else "BEAMS DIFFER (see the JSON)")
    prompts = f"{sc['num_prompts']} prompt{'s' if sc['num_prompts'] > 1 else ''}"
    return (f"beam search, width {sc['beam_width']}, {prompts} x ({sc['prompt_len']} prompt + "
            f"{sc['gen_len']} generated tokens): peak {fmt_bytes(r['peak_bytes']['copied'])} copied vs "
            f"{fmt_bytes(r['peak_bytes']['shared'])} shared, {r['peak_saved_pct']:.1f}% saved at the peak, "
            f"{r['mean_saved_pct']:.1f}% on average over the steps; {same}")


def render_table(results: list[dict]):
    from rich.table import Table

    t = Table(title="KV blocks of beam search: beams sharing blocks (fork) vs each beam holding its own copy",
              caption="blocks in use, read from the pool after the prefill and after every step")
    for col in ("width", "prompts", "prompt + gen", "copied peak", "shared peak", "saved (peak)",
                "copied mean", "shared mean", "saved (mean)", "CoW copies", "beams"):
        t.add_column(col, justify="right")
    for r in results:
        sc, c, s = r["scenario"], r["copied"], r["shared"]
        t.add_row(str(sc["beam_width"]), str(sc["num_prompts"]), f"{sc['prompt_len']} + {sc['gen_len']}",
                  f"{c['peak_used_blocks']:,}", f"{s['peak_used_blocks']:,}", f"{r['peak_saved_pct']:.1f}%",
                  f"{c['mean_used_blocks']:,.1f}", f"{s['mean_used_blocks']:,.1f}", f"{r['mean_saved_pct']:.1f}%",
                  f"{s['num_cow_copies']:,}", "identical" if r["identical"] else "DIFFER")
    return t


# -- command line (this scenario alone) ----------------------------------------------------------------------
def parse_args(argv=None):
    p = cli.Parser(description="KV blocks of beam search: beams sharing blocks vs each beam holding its own copy, "
                               "measured from the pool (also run by experiments.memory_share).")
    p.add_argument("--block-size", type=int, default=16, choices=(8, 16, 32), help="tokens per block (default 16)")
    add_flags(p)
    cli.add_common(p, auto_dtype="float16")
    args = p.parse_args(argv)
    cli.check_common(args)
    check_flags(args, cli.in_range)
    if getattr(args, "plot", None):
        raise cli.FlagError("--plot: this experiment draws no plot (python -m experiments.plots draws memory_share's)")
    return args


@cli.guarded
def main(argv=None) -> int:

    args = parse_args(argv)
    backend = cli.resolve_backend(args.device)
    args.device = backend.name
    resolve(args, backend)
    start, report_bytes = time.perf_counter(), LLAMA_1B.bytes_per_block(args.block_size, args.dtype)
    results = [run_beam_scenario(sc, args, backend, report_bytes) for sc in scenarios(args)]
    payload = {"experiment": "memory_beam", "run": cli.run_info(backend), "config": vars(args),
               "reported_shape": {"name": LLAMA_1B.name, "dtype": args.dtype, "bytes_per_block": report_bytes},
               "beam_search": results, "verdicts": [verdict(r, fmt_bytes) for r in results],
               "elapsed_s": round(time.perf_counter() - start, 2)}
    console = cli.console()
    if results:
        console.print(render_table(results))
    for line in payload["verdicts"]:
        console.print(line, soft_wrap=True)
    if args.json:
        console.print(f"wrote {cli.write_json(args.json, payload)}", soft_wrap=True)
    return 0 if all(r["identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
