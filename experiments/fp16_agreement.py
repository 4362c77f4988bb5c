"""fp16_agreement: how many requests of each engine variant (chunked prefill, prefix caching, CUDA graphs,
preemption, asynchronous scheduling) give the tokens of the synchronous eager reference configuration.

A small random model (2 layers, 4 query / 2 KV heads, head_dim 64, vocab 512), 12 prompts sharing a 160-token
document at random lengths, each set twice (the second pass mostly from the prefix cache), greedy, 24 tokens.
In float32 every variant must agree exactly (tests/test_engine_gpu.py asserts it); in float16 a different
summation order may flip a near-tie, so this counts agreement instead of asserting it.

    python -m experiments.fp16_agreement --output-json fp16_agreement.json        (GPU)
"""
from __future__ import annotations

import sys

import numpy as np

from . import cli

GPU_MODEL = dict(vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                 intermediate_size=512, max_position_embeddings=512)
REFERENCE = dict(enable_prefix_caching=False, enable_chunked_prefill=False, cuda_graph=False,
                 max_num_batched_tokens=4096, async_scheduling=False)
VARIANTS = {
    "chunked": dict(max_num_batched_tokens=48),
    "cached": dict(enable_chunked_prefill=False, max_num_batched_tokens=4096),
    "graphs": dict(enable_prefix_caching=False, enable_chunked_prefill=False, max_num_batched_tokens=4096,
                   cuda_graph=True),
    "all": dict(max_num_batched_tokens=48, cuda_graph=True),
    "all-preempting": dict(max_num_batched_tokens=48, cuda_graph=True, num_blocks=40, watermark=0.0),
    "all-sync": dict(max_num_batched_tokens=48, cuda_graph=True, async_scheduling=False),
    "eager-sampler": dict(max_num_batched_tokens=48),  # asynchronous, no graphs: eager forward + sampler
}
MAX_TOKENS = 24


def small_engine(dtype: str, device: str = "gpu", **overrides):
    """The small random-weight engine of the agreement runs (and of the engine's GPU tests)."""
    from pagedkv.engine import EngineConfig, LLMEngine
    from pagedkv.model import ModelConfig

    kwargs = dict(model=ModelConfig(**GPU_MODEL), device=device, dtype=dtype, block_size=16, num_blocks=256,
                  max_num_seqs=16, max_model_len=320, seed=0)
    return LLMEngine(EngineConfig(**{**kwargs, **overrides}))


def shared_prompts(num: int = 12, seed: int = 0) -> list[list[int]]:
    """``num`` prompts: a prefix of one 160-token document (0, 40, 100 or 160 tokens) + 1..59 own tokens."""
    rng = np.random.default_rng(seed)
    doc = rng.integers(0, 512, 160).tolist()
    return [doc[:int(rng.choice([0, 40, 100, 160]))] + rng.integers(0, 512, int(rng.integers(1, 60))).tolist()
            for _ in range(num)]


def run_twice(engine, prompts, params) -> list[list[list[int]]]:
    """Each prompt set twice (the second pass mostly from the prefix cache); token ids of every branch."""
    first = engine.generate(prompts, params, progress=False)
    second = engine.generate(prompts, params, progress=False)
    return [[c.token_ids for c in o.outputs] for o in first + second]


def agreement(dtype: str = "float16", device: str = "gpu", seed: int = 1) -> dict:
    """Requests of each variant identical to the reference configuration's, greedy."""
    from pagedkv.engine import SamplingParams

    params = SamplingParams(n=1, temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = shared_prompts(seed=seed)
    want = run_twice(small_engine(dtype, device, **REFERENCE), prompts, params)
    rows = {}
    for name, variant in VARIANTS.items():
        got = run_twice(small_engine(dtype, device, **variant), prompts, params)
        rows[name] = sum(a == b for a, b in zip(got, want))
        print(f"{dtype} {name}: {rows[name]}/{len(want)} requests agree with the synchronous eager reference",
              flush=True)
    return {"dtype": dtype, "num_requests": len(want), "agree": rows}


@cli.guarded
def main(argv=None) -> int:
    p = cli.Parser(description=__doc__.splitlines()[0])
    cli.add_common(p, auto_dtype="float16", plot=False)
    args = p.parse_args(argv)
    cli.check_common(args)
    backend = cli.resolve_backend(args.device)
    if not backend.is_gpu:
        raise cli.FlagError("fp16_agreement compares CUDA-graph and asynchronous variants: it needs a GPU")
    result = {"info": cli.run_info(backend), **agreement(args.dtype, backend.name, seed=args.seed + 1)}
    if args.json:
        print(f"wrote {cli.write_json(args.json, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
