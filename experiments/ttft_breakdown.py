"""ttft_breakdown: where the engine's time to first token goes, beside transformers' forward split alike.

One prompt of N tokens per length (a random-weight preset, prefix caching off, CUDA graphs off, the whole
prompt in one prefill step, as ``prefill_bench``'s TTFT part), all in one process:

  engine      ``LLMEngine.generate(max_tokens=1)``, wall time: what prefill_bench's TTFT times
  forward     ``engine.model.prefill`` of the same N tokens alone
  gemms       its GEMMs alone at N rows: every layer's QKV, O, gate/up and down; the LM head on 1 row
  attention   its attention alone: the model's attention backend on the batch's metadata, every layer (the cache
              write and the paged prefill kernel on a GPU)
  rest        forward - gemms - attention: embedding, norms, RoPE, activation, the final norm and logits
  host        engine - forward: scheduling, block tables, sampling, the output
  hf          transformers' ``LlamaForCausalLM(ids, logits_to_keep=1)`` of the same shape (GPU only), wall
  hf_sdpa     torch SDPA alone on the same shapes (causal, KV heads expanded as transformers does), every layer
  hf_rest     hf - hf_sdpa
  attention for 0.8x   the attention time that would put engine / hf at 0.8 with everything else unchanged
                       (issue 16's TTFT target): 0.8 * hf - (engine - attention)

forward, gemms and attention are CUDA-event medians of ``--runs`` calls after a warm-up; engine, hf and hf_sdpa
wall-time medians (the device synchronised around each call); on the CPU every time is the wall clock and the
transformers columns are left out.

    python -m experiments.ttft_breakdown --device gpu --lens 2048 8192 32768
"""
from __future__ import annotations

import sys

import numpy as np

from . import cli
from .engine_bench import _gemms, gpu_time, profile_prefill
from .prefill_bench import BLOCK_SIZE, _hf_model, _wall_ms, ttft_engine, ttft_num_blocks

DEFAULT_LENS = {"gpu": (2048, 8192, 32768), "cpu": (64, 128)}
DEFAULT_MODEL = {"gpu": "llama-1b", "cpu": "tiny"}
TARGET = 0.8  # issue 16: engine TTFT <= 0.8x transformers at 2k, 8k and 32k


def parse_args(argv=None):
    from pagedkv.model.config import PRESETS

    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--lens", nargs="+", type=int, default=None,
                   help="prompt lengths (default 2048 8192 32768 on a GPU, 64 128 on the CPU)")
    p.add_argument("--model", default="auto", choices=("auto", *PRESETS),
                   help="random-weight model preset (default: llama-1b on a GPU, tiny on the CPU)")
    p.add_argument("--runs", type=int, default=3, help="timed calls per measurement (1..50, default 3)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (GPU): the engine's split only")
    cli.add_common(p, plot=False)
    args = p.parse_args(argv)
    cli.check_common(args)
    cli.in_range("--runs", args.runs, 1, 50)
    for n in args.lens or ():
        cli.in_range("--lens", n, 16, 131072)
    return args


def engine_split(backend, model: str, dtype: str, lens, runs: int, seed: int) -> list[dict]:
    """The engine columns of every length (see the module docstring), seconds."""
    from pagedkv.engine import SamplingParams
    from pagedkv.model.config import PRESETS

    c, rng = PRESETS[model], np.random.default_rng(seed)
    engine = ttft_engine(model, dtype, backend.name, max(lens), seed)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    rows = []
    for n in lens:
        prompt = rng.integers(0, c.vocab_size, n).tolist()
        wall = _wall_ms(backend.xp, lambda: engine.generate([prompt], params, progress=False), runs) / 1e3
        prof = profile_prefill(engine, [prompt])
        gemms = gpu_time(backend.xp, _gemms(engine, n, head_rows=1), reps=runs)
        forward, attention = prof["prefill_forward_s"], prof["prefill_attention_s"]
        rows.append({"prompt_tokens": n, "engine_s": wall, "forward_s": forward, "gemms_s": gemms,
                     "attention_s": attention, "rest_s": forward - gemms - attention, "host_s": wall - forward,
                     "prompt": prompt})
    return rows


def hf_split(backend, model: str, rows: list[dict], runs: int, seed: int) -> None:
    """The transformers columns (GPU): the whole forward, SDPA alone; added to ``rows``."""
    import torch
    import torch.nn.functional as F

    from pagedkv.model.config import PRESETS

    c = PRESETS[model]
    hf = _hf_model(torch, c)
    for row in rows:
        n = row["prompt_tokens"]
        ids = torch.tensor([row["prompt"]], device="cuda")
        with torch.no_grad():
            row["hf_s"] = _wall_ms(backend.xp, lambda: hf(ids, logits_to_keep=1).logits.argmax(-1).item(),
                                   runs) / 1e3
            g = torch.Generator(device="cuda").manual_seed(seed)
            q = torch.randn(1, c.num_heads, n, c.head_dim, device="cuda", dtype=torch.float16, generator=g)
            kv = torch.randn(1, c.num_kv_heads, n, c.head_dim, device="cuda", dtype=torch.float16, generator=g)
            groups = c.num_heads // c.num_kv_heads

            def sdpa():
                for _ in range(c.num_layers):  # transformers' repeat_kv, then SDPA (its sdpa_attention_forward)
                    k = kv[:, :, None].expand(1, c.num_kv_heads, groups, n, c.head_dim).reshape(q.shape)
                    F.scaled_dot_product_attention(q, k, k, is_causal=True)
            row["hf_sdpa_s"] = _wall_ms(backend.xp, sdpa, runs) / 1e3
        row["hf_rest_s"] = row["hf_s"] - row["hf_sdpa_s"]
        row["engine_over_hf"] = row["engine_s"] / row["hf_s"]
        row["attention_over_sdpa"] = row["attention_s"] / row["hf_sdpa_s"]
        row["attention_for_target_s"] = TARGET * row["hf_s"] - (row["engine_s"] - row["attention_s"])


def render(rows: list[dict], device: str):
    from rich.table import Table

    hf = "hf_s" in rows[0]
    table = Table(title=f"time to first token, ms ({device}; engine = wall of generate(max_tokens=1))")
    cols = ["tokens", "engine", "forward", "gemms", "attention", "rest", "host"]
    cols += ["hf", "hf sdpa", "hf rest", "engine / hf", "attn / sdpa", f"attn for {TARGET}x"] if hf else []
    for col in cols:
        table.add_column(col, justify="right")
    ms = lambda x: f"{x * 1e3:.1f}"  # noqa: E731
    for r in rows:
        cells = [f"{r['prompt_tokens']:,}", *(ms(r[k]) for k in ("engine_s", "forward_s", "gemms_s", "attention_s",
                                                                    "rest_s", "host_s"))]
        if hf:
            cells += [ms(r["hf_s"]), ms(r["hf_sdpa_s"]), ms(r["hf_rest_s"]), f"{r['engine_over_hf']:.2f}",
                      f"{r['attention_over_sdpa']:.2f}", ms(r["attention_for_target_s"])]
        table.add_row(*cells)
    return table


@cli.guarded
def main(argv=None) -> int:
    """Run the split at every length; print the table, write the JSON where asked."""
    args = parse_args(argv)
    backend = cli.resolve_backend(args.device)
    kind = "gpu" if backend.is_gpu else "cpu"
    model = DEFAULT_MODEL[kind] if args.model == "auto" else args.model
    dtype = args.dtype if args.dtype != "auto" else ("float16" if backend.is_gpu else "float32")
    lens = sorted(args.lens or DEFAULT_LENS[kind])
    if backend.is_gpu and not args.no_hf:
        import importlib.util

        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise cli.FlagError(f"the transformers columns need {' and '.join(missing)} installed; pass --no-hf "
                                f"for the engine's split alone")
    from pagedkv.backend import dtype_of
    from pagedkv.model.config import PRESETS

    c = PRESETS[model]
    max_len = max(lens) + BLOCK_SIZE
    kv_bytes = (ttft_num_blocks(max(lens)) * BLOCK_SIZE * 2 * c.num_layers * c.num_kv_heads * c.head_dim
                * dtype_of(dtype).itemsize)
    parts = cli.engine_bytes(c, dtype, kv_bytes=kv_bytes, max_num_batched_tokens=max_len, max_len=max_len,
                             max_num_seqs=1)
    need = sum(parts.values())
    cli.require_memory(host=0 if backend.is_gpu else need, device=need, parts=parts, backend=backend)
    rows = engine_split(backend, model, dtype, lens, args.runs, args.seed)
    if backend.is_gpu and not args.no_hf:
        backend.xp.get_default_memory_pool().free_all_blocks()  # the engine is gone: its pool goes to torch
        hf_split(backend, model, rows, args.runs, args.seed)
    for r in rows:
        del r["prompt"]
    info = cli.run_info(backend)
    cli.console().print(render(rows, info["device"]))
    if args.json:
        payload = {"info": info, "model": model, "dtype": dtype, "runs": args.runs, "target": TARGET, "rows": rows}
        print(f"wrote {cli.write_json(args.json, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
