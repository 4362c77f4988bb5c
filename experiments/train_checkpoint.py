"""train_checkpoint: a small Llama trained on the CPU for minutes, saved as a Hugging Face folder.

Why: the random-weight presets are poor probes of how far a lossy KV cache (fp8) moves a model. Their
next-token distributions are near one-hot (llama-1b: tied embeddings of std 1, logits of std ~45, so every
perturbation keeps the argmax) or near uniform (tiny: logits of std ~1, so the argmax turns on ties). A
trained model's distributions sit in between, as a real checkpoint's do, and the folder is a real Hugging
Face checkpoint (``config.json``, ``model.safetensors``, ``tokenizer.json``) that goes through pagedkv's
loader. This machine has no Hub access; the text is the Python standard library's own sources.

Method: a byte-level BPE (``pagedkv.text.train.train_tokenizer``, ``--vocab-size``) on the text; a
``transformers`` ``LlamaForCausalLM`` (``--layers``, ``--hidden``, GQA 4 / 2 heads of 64) trained with AdamW
(warm-up, cosine decay) on random windows of ``--context`` tokens; the last 2 % of the tokens held out. The
report (losses, sizes, time, and the loader check: pagedkv's next-token log-probabilities on the saved folder
against the trained model's) goes to ``<out>/train_report.json``; ``--verify`` runs that check alone.

Needs ``torch`` and ``transformers`` (not pagedkv dependencies: a CPU build of torch is enough).

    python -m experiments.train_checkpoint --out /tmp/pystdlib-llama     # ~10 min on 2 CPU cores
    python -m experiments.fp8_accuracy --device cpu --checkpoint /tmp/pystdlib-llama --skip-preset
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np


def read_text(folder: Path, max_bytes: int) -> list[str]:
    """The ``*.py`` files under ``folder`` (sorted, tests and site-packages left out) up to ``max_bytes``."""
    docs, total = [], 0
    for path in sorted(folder.rglob("*.py")):
        if any(part in ("site-packages", "test", "tests", "idlelib") for part in path.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        total += len(text.encode())
        if total >= max_bytes:
            break
    if not docs:
        raise SystemExit(f"train_checkpoint: no readable *.py files under {folder}")
    return docs


def encode(tokenizer, docs: list[str], eos: int) -> np.ndarray:
    ids = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def held_out_loss(torch, model, ids, context: int, windows: int = 16) -> float:
    rng = np.random.default_rng(1)
    starts = rng.integers(0, len(ids) - context - 1, windows)
    batch = torch.as_tensor(np.stack([ids[s:s + context + 1] for s in starts]))
    with torch.no_grad():
        return float(model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone()).loss)


def logprob_gap_vs_pagedkv(torch, model, folder: Path, prompt_len: int = 40, top: int = 20) -> float:
    """The largest |log-probability difference| over the top ``top`` next tokens of one random prompt between
    ``model`` (transformers, float32) and pagedkv's ``LLM`` on the saved ``folder`` (float32): the loader check."""
    from pagedkv import LLM, SamplingParams

    ids = [int(i) for i in np.random.default_rng(0).integers(0, model.config.vocab_size, prompt_len)]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double().numpy()
    ref = logits - logits.max()
    ref -= np.log(np.exp(ref).sum())
    out = LLM(str(folder), dtype="float32").generate([{"prompt_token_ids": ids}],
                                                     SamplingParams(max_tokens=1, temperature=0, logprobs=top))
    return max(abs(v.logprob - ref[k]) for k, v in out[0].outputs[0].logprobs[0].items())


def verify(folder: Path) -> int:
    """``--verify``: the loader check on a folder this tool wrote, added to its train_report.json."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    gap = logprob_gap_vs_pagedkv(torch, model, folder)
    report_path = folder / "train_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["max_logprob_gap_vs_pagedkv"] = gap
    report_path.write_text(json.dumps(report, indent=1))
    print(f"pagedkv vs transformers on {folder}: max |log-probability gap| over the top 20 tokens {gap:.2e}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the Hugging Face folder to write")
    p.add_argument("--text", default=sysconfig.get_paths()["stdlib"],
                   help="folder of *.py files to train on (default: this Python's standard library)")
    p.add_argument("--max-bytes", type=int, default=6 << 20, help="text bytes read (default 6 MiB)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true",
                   help="only compare pagedkv with transformers on the folder --out (already trained)")
    args = p.parse_args(argv)
    if args.verify:
        return verify(Path(args.out))
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise SystemExit(f"train_checkpoint needs torch and transformers ({exc})") from exc
    from pagedkv.text.train import train_tokenizer

    t0, out = time.perf_counter(), Path(args.out)
    torch.manual_seed(args.seed)
    docs = read_text(Path(args.text), args.max_bytes)
    tokenizer = train_tokenizer(out, args.vocab_size, corpus=docs)
    eos = tokenizer.eos_token_id
    ids = encode(tokenizer, docs, eos)
    split = int(len(ids) * 0.98)
    train_ids, test_ids = ids[:split], ids[split:]
    print(f"text: {len(docs)} files, {sum(len(d.encode()) for d in docs) / 2**20:.1f} MiB, {len(ids):,} tokens "
          f"(vocab {args.vocab_size}), {time.perf_counter() - t0:.0f} s", flush=True)

    heads, kv_heads, head_dim = args.hidden // 64, max(1, args.hidden // 128), 64
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=4 * args.context, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=None, eos_token_id=eos)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(args.seed)
    losses = []
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=max(1, args.steps // 12))
        starts = rng.integers(0, len(train_ids) - args.context - 1, args.batch)
        batch = torch.as_tensor(np.stack([train_ids[s:s + args.context] for s in starts]))
        loss = model(input_ids=batch, labels=batch.clone()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {np.mean(losses[-50:]):.3f}  {time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    test_loss = held_out_loss(torch, model, test_ids, args.context)
    model.save_pretrained(out, safe_serialization=True)
    gap = logprob_gap_vs_pagedkv(torch, model, out)
    report = {"text": str(args.text), "files": len(docs), "tokens": int(len(ids)), "vocab_size": args.vocab_size,
              "layers": args.layers, "hidden": args.hidden, "heads": heads, "kv_heads": kv_heads,
              "head_dim": head_dim, "parameters": sum(t.numel() for t in model.parameters()),
              "steps": args.steps, "batch": args.batch, "context": args.context, "lr": args.lr,
              "final_train_loss": float(np.mean(losses[-50:])), "held_out_loss": test_loss,
              "max_logprob_gap_vs_pagedkv": gap, "seconds": round(time.perf_counter() - t0, 1),
              "torch": torch.__version__}
    (out / "train_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
