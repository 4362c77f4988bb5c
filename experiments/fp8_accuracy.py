"""fp8_accuracy: how far an fp8 KV cache moves a model's outputs from the cache in the model's dtype.

Method, one run, one device, the same weights for every cache:
  1. greedy: N prompts (random token ids, lengths U[32, 256], --seed) x T generated tokens (ignore_eos),
     with ``kv_cache_dtype="auto"`` and with each fp8 format; token agreement = share of (prompt, position)
     pairs with the same token; also the share of whole sequences identical and the mean common prefix.
  2. next-token distributions: along the auto cache's greedy sequences (teacher forcing, so both caches see the
     same tokens), the logits at each of the T generated positions from one prefill of prompt + continuation
     per sequence, with each cache; KL(p_auto || p_fp8) in float64, averaged over positions and prompts (and its
     maximum), and the top-1 agreement of the two distributions.
fp8 scales: calibrated over the first prompts (``calculate_kv_scales``), or a checkpoint's ``k_scale`` /
``v_scale`` tensors (``--checkpoint``; ``--write-checkpoint`` first saves a random model of ``--model`` there
with calibrated scales, so the run also goes through the Hugging Face loader and its scale tensors).

    python -m experiments.fp8_accuracy                                  # CPU: tiny, 8 x 16 (seconds)
    python -m experiments.fp8_accuracy --device gpu --model llama-1b    # 64 prompts x 64 tokens, float16
    python -m experiments.fp8_accuracy --device gpu --model llama-1b --write-checkpoint /tmp/ck --checkpoint /tmp/ck
"""
from __future__ import annotations

import sys
import time

import numpy as np

from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams
from pagedkv.fp8 import FP8_DTYPES

from . import cli

GPU_DEFAULTS = {"model": "llama-1b", "num_prompts": 64, "gen_len": 64}
CPU_DEFAULTS = {"model": "tiny", "num_prompts": 8, "gen_len": 16}
PROMPT_LENS = (32, 256)
KL_GROUP = 4  # sequences per teacher-forced prefill (their logits for every position are on the device at once)


def workload(num_prompts: int, vocab: int, seed: int, max_len: int):
    rng = np.random.default_rng(seed)
    lo, hi = min(PROMPT_LENS[0], max_len // 4), min(PROMPT_LENS[1], max_len // 2)
    return [rng.integers(0, vocab, int(rng.integers(lo, hi + 1))).tolist() for _ in range(num_prompts)]


def make_engine(args, kv: str, weights=None, model_config=None, checkpoint=None) -> LLMEngine:
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, seed=args.seed, block_size=16,
                          num_blocks=args.num_blocks, max_num_seqs=args.num_prompts, max_model_len=args.max_len,
                          max_num_batched_tokens=max(4096, args.max_len), kv_cache_dtype=kv,
                          calculate_kv_scales=kv != "auto" and checkpoint is None, cuda_graph=args.device == "gpu")
    if checkpoint is not None:
        return LLMEngine.from_checkpoint(checkpoint, config)
    return LLMEngine(config, model_config=model_config, weights=weights)


def greedy(engine: LLMEngine, prompts, gen_len: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    return [o.outputs[0].token_ids for o in engine.generate(prompts, params, progress=False)]


def teacher_forced_logprobs(engine: LLMEngine, kv_cache, seqs, prompt_lens, gen_len: int):
    """Per sequence, float64 log-probabilities [gen_len, vocab] of the tokens after each of its last gen_len
    positions (prompt's last token .. the continuation's second to last), one prefill per group."""
    from pagedkv.model import PrefillBatch

    out = []
    for g in range(0, len(seqs), KL_GROUP):
        group, plens = seqs[g:g + KL_GROUP], prompt_lens[g:g + KL_GROUP]
        tables, slots, rows, first, start = [], [], [], 0, 0
        for s, p in zip(group, plens):
            n = -(-len(s) // kv_cache.block_size)
            tables.append(list(range(first, first + n)))
            slots.append(np.arange(len(s), dtype=np.int64) + first * kv_cache.block_size)
            rows.append(start + np.arange(p - 1, p - 1 + gen_len))
            first, start = first + n, start + len(s)
        batch = PrefillBatch(token_ids=np.concatenate([np.asarray(s, np.int64) for s in group]),
                             positions=np.concatenate([np.arange(len(s), dtype=np.int64) for s in group]),
                             slot_mapping=np.concatenate(slots), seq_lens=[len(s) for s in group],
                             num_cached=[0] * len(group), block_tables=tables, logit_rows=np.concatenate(rows))
        logits = engine.model.prefill(batch, kv_cache)
        x = np.asarray(logits.get() if hasattr(logits, "get") else logits, dtype=np.float64)
        x -= x.max(axis=-1, keepdims=True)
        x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
        out.extend(np.split(x, len(group)))
    return out


def scratch_cache(engine: LLMEngine, seqs, kv: str, source):
    """A cache just big enough for the largest group of ``KL_GROUP`` sequences of ``seqs`` (teacher_forced_logprobs
    prefills one group at a time) in format ``kv`` with the scales of ``source`` (an engine's cache)."""
    from pagedkv import KVCache

    c = engine.kv_cache
    blocks = max(sum(-(-len(s) // c.block_size) for s in seqs[g:g + KL_GROUP]) for g in range(0, len(seqs), KL_GROUP))
    blocks += 1
    scales = dict(k_scales=source.k_scales, v_scales=source.v_scales) if kv != "auto" else {}
    return KVCache(c.num_layers, blocks, c.block_size, c.num_kv_heads, c.head_dim, c.dtype, c.backend.name,
                   None if kv == "auto" else kv, **scales)


def compare(ref_tokens, tokens, ref_lp, lp) -> dict:
    same = np.array([[a == b for a, b in zip(x, y)] for x, y in zip(ref_tokens, tokens)])
    prefix = [int(np.argmin(row)) if not row.all() else len(row) for row in same]
    kl = np.array([(np.exp(p) * (p - q)).sum(axis=-1) for p, q in zip(ref_lp, lp)])  # [prompts, gen_len]
    top1 = np.mean([np.mean(p.argmax(-1) == q.argmax(-1)) for p, q in zip(ref_lp, lp)])
    # NOTE: how peaked the auto cache's distributions are decides what agreement means: near 0 nats (a
    # one-hot argmax, as llama-1b's random preset gives) every small perturbation keeps the argmax
    entropy = np.array([-(np.exp(p) * p).sum(axis=-1) for p in ref_lp])
    return {"token_agreement": float(same.mean()), "sequences_identical": float(same.all(axis=1).mean()),
            "mean_entropy_nats": float(entropy.mean()),
            "mean_common_prefix": float(np.mean(prefix)), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "median_kl": float(np.median(kl)), "top1_agreement_teacher_forced": float(top1)}


def evaluate(args, label: str, prompts, weights=None, model_config=None, checkpoint=None) -> list[dict]:
    """The auto cache, then each fp8 format, on one model; returns one row per fp8 format."""
    t0 = time.perf_counter()
    auto = make_engine(args, "auto", weights, model_config, checkpoint)
    weights, model_config = auto.model.weights, auto.model_config
    ref_tokens = greedy(auto, prompts, args.gen_len)
    seqs = [p + t[:-1] for p, t in zip(prompts, ref_tokens)]  # the last token predicts nothing here
    plens = [len(p) for p in prompts]
    ref_lp = teacher_forced_logprobs(auto, scratch_cache(auto, seqs, "auto", auto.kv_cache), seqs, plens,
                                     args.gen_len)
    rows = []
    for kv in args.kv_cache_dtypes:
        eight = make_engine(args, kv, weights, model_config, checkpoint)
        tokens = greedy(eight, prompts, args.gen_len)
        lp = teacher_forced_logprobs(eight, scratch_cache(eight, seqs, kv, eight.kv_cache), seqs, plens,
                                     args.gen_len)
        c = eight.kv_cache
        rows.append({"model": label, "kv_cache_dtype": kv, "dtype": str(auto.model.dtype),
                     "scales": "checkpoint" if checkpoint is not None else "calibrated",
                     "k_scale_range": [float(c.k_scales.min()), float(c.k_scales.max())],
                     "v_scale_range": [float(c.v_scales.min()), float(c.v_scales.max())],
                     "num_prompts": len(prompts), "gen_len": args.gen_len,
                     **compare(ref_tokens, tokens, ref_lp, lp), "elapsed_s": round(time.perf_counter() - t0, 1)})
        eight = None
        print(f"{label} {kv}: " + ", ".join(f"{k}={v:.4g}" for k, v in rows[-1].items() if isinstance(v, float)),
              flush=True)
    return rows


def write_checkpoint(args, prompts) -> None:
    """A random model of ``--model`` saved to ``--write-checkpoint`` with scales calibrated on ``prompts``."""
    from pagedkv.model.export import save_checkpoint

    eng = make_engine(args, args.kv_cache_dtypes[0])
    eng.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=1), progress=False)  # calibrates
    save_checkpoint(args.write_checkpoint, eng.model_config, eng.model.weights, dtype=str(eng.model.dtype),
                    kv_scales=(eng.kv_cache.k_scales, eng.kv_cache.v_scales))


def parse_args(argv=None):
    from pagedkv.model.config import PRESETS

    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="auto", choices=("auto", *PRESETS),
                   help="random-weight preset (default: llama-1b on a GPU, tiny on the CPU)")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="also evaluate this Hugging Face folder")
    p.add_argument("--write-checkpoint", default=None, metavar="DIR",
                   help="first save a random --model there, with calibrated fp8 scales")
    p.add_argument("--num-prompts", type=int, default=None, help="prompts (default 64 on a GPU, 8 on the CPU)")
    p.add_argument("--gen-len", type=int, default=None, help="generated tokens per prompt (default 64 / 16)")
    p.add_argument("--kv-cache-dtypes", nargs="+", default=["fp8_e4m3"], choices=FP8_DTYPES,
                   help="fp8 formats compared with the model-dtype cache (default fp8_e4m3)")
    p.add_argument("--num-gpu-blocks-override", dest="num_blocks", type=int, default=None, metavar="N",
                   help="KV blocks per engine (default: the engine's)")
    p.add_argument("--skip-preset", action="store_true", help="evaluate only --checkpoint")
    cli.add_common(p, plot=False)
    args = p.parse_args(argv)
    cli.check_common(args)
    for flag, dest, lo, hi in (("--num-prompts", "num_prompts", 1, 1024), ("--gen-len", "gen_len", 2, 4096),
                               ("--num-gpu-blocks-override", "num_blocks", 1, 10**7)):
        if getattr(args, dest) is not None:
            cli.in_range(flag, getattr(args, dest), lo, hi)
    if args.skip_preset and args.checkpoint is None:
        raise cli.FlagError("--skip-preset needs --checkpoint")
    return args


def resolve(args, backend) -> None:
    gpu = backend.is_gpu
    args.device = backend.name
    defaults = GPU_DEFAULTS if gpu else CPU_DEFAULTS
    args.model = args.model if args.model != "auto" else defaults["model"]
    args.dtype = args.dtype if args.dtype != "auto" else ("float16" if gpu else "float32")
    args.num_prompts = args.num_prompts or defaults["num_prompts"]
    args.gen_len = args.gen_len or defaults["gen_len"]
    args.max_len = PROMPT_LENS[1] + args.gen_len + 16
    if gpu and args.dtype == "float32":
        raise cli.FlagError("an fp8 KV cache on a GPU needs --dtype float16 or bfloat16")


def render(rows: list[dict], info: dict):
    from rich.table import Table

    t = Table(title=f"fp8 KV cache vs the model-dtype cache — {info['device']}, {info['date_utc']}",
              caption="greedy agreement over prompts x generated tokens; KL(p_auto || p_fp8) of next-token "
                      "distributions along the auto cache's greedy sequences (teacher forcing); entropy: of the "
                      "auto cache's distributions there")
    for col in ("model", "cache", "scales", "prompts x tokens", "entropy (nats)", "token agreement",
                "identical seqs", "mean prefix", "mean KL", "median KL", "max KL", "top-1 (forced)"):
        t.add_column(col, justify="left" if col in ("model", "cache", "scales") else "right")
    for r in rows:
        t.add_row(r["model"], r["kv_cache_dtype"], r["scales"], f"{r['num_prompts']} x {r['gen_len']}",
                  f"{r['mean_entropy_nats']:.2f}", f"{100 * r['token_agreement']:.1f}%",
                  f"{100 * r['sequences_identical']:.0f}%",
                  f"{r['mean_common_prefix']:.1f}", f"{r['mean_kl']:.2e}", f"{r['median_kl']:.2e}",
                  f"{r['max_kl']:.2e}", f"{100 * r['top1_agreement_teacher_forced']:.1f}%")
    return t


@cli.guarded
def main(argv=None) -> int:
    from pagedkv.model import get_config

    args = parse_args(argv)
    backend = cli.resolve_backend(args.device)
    resolve(args, backend)
    prompts = workload(args.num_prompts, get_config(args.model).vocab_size, args.seed, args.max_len)
    rows = [] if args.skip_preset else evaluate(args, f"{args.model} (random, preset)", prompts)
    if args.write_checkpoint:
        write_checkpoint(args, prompts)
    if args.checkpoint:
        rows += evaluate(args, f"checkpoint {args.checkpoint}", prompts, checkpoint=args.checkpoint)
    payload = {"experiment": "fp8_accuracy", "run": cli.run_info(backend), "config": vars(args), "rows": rows}
    cli.console().print(render(rows, payload["run"]))
    if args.json:
        print(f"wrote {cli.write_json(args.json, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
