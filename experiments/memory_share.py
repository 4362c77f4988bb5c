"""memory_share: how much KV memory prefix sharing (fork + copy-on-write) saves, measured from the pool.

Two scenarios, each run in two modes on two pools, in lockstep:

    shared-prompt      N requests = one long system prompt (a RAG document) + a short distinct suffix,
                       each then generates G tokens
    parallel-sampling  n branches of one prompt, each generates G tokens
    beam-search        one beam search per width (--beam-widths 2 4 8) through a tiny random Llama: beams
                       sharing blocks (fork) vs each beam holding its own copy (``experiments.memory_beam``)

    naive   every request writes its own copy of the prompt's K/V       (add_sequence(P, k=, v=) × N)
              pool: [ doc ][ doc ][ doc ] ... [ doc ]   + suffix and generated tokens of each
    shared  the prompt is written once, then forked per request         (add_sequence × 1, fork_sequence × N)
              pool: [ doc ] + per request: [ copy of the doc's partial last block | suffix | generated ]
                                              ^ copy-on-write at the first divergent token, nothing else moves

Every number comes from ``PagedAttentionManager.usage()`` of the pools themselves, whose K/V shape is
llama-1b's on a GPU (really allocated) and a small one on the CPU (bytes then reported at llama-1b's block
size: block counts do not depend on the shape). Both pools receive the same K/V for every logical token, so
every decode attention output (every request, layer and step) must be bit-identical. Then the same scenario
runs through a tiny random Llama (``pagedkv.model``): its greedy tokens and logits must be bit-identical too.
The run compares everything and exits 1 if anything differs.

The "fp8 memory" column: the same blocks in an fp8 KV cache (1 byte per element: half of float16's bytes).
``--kv-cache-dtype fp8`` also allocates the pools (and the model check's) in fp8, so the comparisons then run
on quantized bytes.

    python -m experiments.memory_share                       # small sizes on the CPU: seconds
    python -m experiments.memory_share --device gpu --num-requests 256 --prompt-len 4000 --gen-len 128
    python -m experiments.memory_share --kv-cache-dtype fp8

Over 400 lines because its three scenarios (parallel sampling, shared prefix, beams) report from one pool
model and one table, with the memory checks that refuse a run before it allocates.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from pagedkv import KVCache, PagedAttentionManager
from pagedkv.backend import dtype_of, to_numpy
from pagedkv.fp8 import KV_CACHE_DTYPES

from . import cli, memory_beam
from .kv_shapes import LLAMA_1B, SMALL, KVShape, fmt_bytes

BLOCK_SIZES = (8, 16, 32)
ALLOC_SHAPES = ("auto", "small", "llama-1b")


@dataclass(frozen=True, slots=True)
class Scenario:
    """``num_requests`` sequences of ``prompt_len`` shared tokens + ``suffix_len`` own ones + ``gen_len`` decoded.

    ``parent_is_request``: parallel sampling, where the prefilled sequence is branch 0; otherwise the prefilled
    prompt stays as its own sequence (a cached prefix) and every request is a fork of it.
    """

    name: str
    num_requests: int
    prompt_len: int
    suffix_len: int
    gen_len: int
    parent_is_request: bool

    def blocks_needed(self, mode: str, block_size: int) -> int:
        """Blocks a mode needs at the end of the run (an upper bound for ``shared``)."""
        per_request = -(-(self.prompt_len + self.suffix_len + self.gen_len) // block_size)
        if mode == "naive":
            return self.num_requests * per_request
        private = per_request - self.prompt_len // block_size  # a copy of the partial block + new blocks
        return -(-self.prompt_len // block_size) + self.num_requests * private


@dataclass(frozen=True, slots=True)
class ModeResult:
    """One mode's pool at the end of the run (before freeing), and its peak."""

    mode: str
    num_pool_blocks: int
    num_used_blocks: int
    peak_used_blocks: int
    num_token_slots_used: int
    num_logical_tokens: int
    num_shared_blocks: int
    num_cow_copies: int
    bytes_used: int          # at the reported shape
    peak_bytes: int          # at the reported shape
    allocated_bytes_used: int  # at the shape really allocated in this run
    bytes_used_fp8: int      # the same blocks at the reported shape in an fp8 KV cache


class Pool:
    """One mode's manager, its requests' sequence ids and its used-block timeline."""

    def __init__(self, mode: str, manager: PagedAttentionManager):
        self.mode, self.manager = mode, manager
        self.seq_ids: list[int] = []
        self.timeline: list[int] = []

    def record(self) -> None:
        self.timeline.append(self.manager.usage().num_used_blocks)

    def prefill(self, sc: Scenario, k, v) -> None:
        """Write the prompt: once per request (naive) or once and fork it (shared)."""
        m = self.manager
        if self.mode == "naive":
            self.seq_ids = [m.add_sequence(sc.prompt_len, k=k, v=v) for _ in range(sc.num_requests)]
            return
        parent = m.add_sequence(sc.prompt_len, k=k, v=v)
        forks = [m.fork_sequence(parent) for _ in range(sc.num_requests - sc.parent_is_request)]
        self.seq_ids = [parent] * sc.parent_is_request + forks

    def append(self, k, v) -> None:
        """Append ``k, v: [num_layers, num_requests, num_tokens, H, D]``, one write per layer (copy-on-write inside)."""
        m, kv = self.manager, self.manager.kv_cache
        num_tokens = k.shape[2]
        slots = np.concatenate([m.append_slots(s, num_tokens) for s in self.seq_ids])
        slots = kv.xp.asarray(slots)
        for layer in range(kv.num_layers):
            kv.write(layer, slots, k[layer].reshape(-1, *k.shape[3:]), v[layer].reshape(-1, *v.shape[3:]))

    def result(self, report_bytes: int, fp8_bytes: int) -> ModeResult:
        u = self.manager.usage()
        peak = max(self.timeline)
        return ModeResult(self.mode, u.num_blocks, u.num_used_blocks, peak, u.num_token_slots_used,
                          u.num_logical_tokens, u.num_shared_blocks, u.num_cow_copies,
                          u.num_used_blocks * report_bytes, peak * report_bytes, u.bytes_used,
                          u.num_used_blocks * fp8_bytes)

    def free_all(self) -> int:
        for s in set(self.manager.seq_ids):
            self.manager.free_sequence(s)
        return self.manager.usage().num_used_blocks


class Draw:
    """Seeded standard-normal draws on the pool's array module, cast to the pool's dtype."""

    def __init__(self, xp, seed: int, dtype):
        self.dtype = dtype
        self.rng = np.random.default_rng(seed) if xp is np else xp.random.RandomState(seed)

    def __call__(self, *shape):
        return self.rng.standard_normal(shape, dtype=np.float32).astype(self.dtype)


@dataclass(slots=True)
class Comparison:
    """Decode attention outputs compared between the two pools."""

    num_outputs: int = 0
    num_different: int = 0
    max_abs_diff: float = 0.0

    def add(self, xp, a, b) -> None:
        equal = xp.all(a == b, axis=(1, 2))
        self.num_outputs += int(a.shape[0])
        self.num_different += int(a.shape[0] - int(equal.sum()))
        diff = xp.abs(a.astype(np.float32) - b.astype(np.float32)).max()
        self.max_abs_diff = max(self.max_abs_diff, float(diff))

    @property
    def identical(self) -> bool:
        return self.num_outputs > 0 and self.num_different == 0


def run_scenario(sc: Scenario, shape: KVShape, args, backend, progress=None) -> dict:
    """Run one scenario in both modes, in lockstep, and return its JSON-ready result."""
    pools = [Pool(mode, _manager(sc, mode, shape, args)) for mode in ("naive", "shared")]
    draw = Draw(backend.xp, args.seed, pools[0].manager.kv_cache.dtype)
    L, H, D, N = shape.num_layers, shape.num_kv_heads, shape.head_dim, sc.num_requests
    k, v = draw(L, sc.prompt_len, H, D), draw(L, sc.prompt_len, H, D)
    _each(pools, lambda p: p.prefill(sc, k, v))
    if sc.suffix_len:
        k, v = draw(L, N, sc.suffix_len, H, D), draw(L, N, sc.suffix_len, H, D)
        _each(pools, lambda p: p.append(k, v))
    cmp = Comparison()
    task = progress.add_task(sc.name, total=sc.gen_len) if progress else None
    for _ in range(sc.gen_len):
        _decode_step(pools, draw, shape, N, cmp, backend.xp)
        if progress:
            progress.advance(task)
    report_bytes = LLAMA_1B.bytes_per_block(args.block_size, args.dtype)
    fp8_bytes = LLAMA_1B.bytes_per_block(args.block_size, args.dtype, "fp8")
    naive, shared = (p.result(report_bytes, fp8_bytes) for p in pools)
    leaked = [p.free_all() for p in pools]
    assert leaked == [0, 0], f"blocks still used after freeing every sequence: {leaked}"
    return {"scenario": asdict(sc), "naive": asdict(naive), "shared": asdict(shared),
            "saved_pct": 100.0 * (1 - shared.num_used_blocks / naive.num_used_blocks),
            "peak_saved_pct": 100.0 * (1 - shared.peak_used_blocks / naive.peak_used_blocks),
            "outputs": {"compared": "decode attention output of every request, layer and step",
                        "num_outputs": cmp.num_outputs, "num_different": cmp.num_different,
                        "max_abs_diff": cmp.max_abs_diff, "identical": cmp.identical},
            "timeline_used_blocks": {p.mode: p.timeline for p in pools}}


def _decode_step(pools, draw, shape: KVShape, N: int, cmp: Comparison, xp) -> None:
    """One generated token per request: append its K/V in both pools, then compare every layer's attention."""
    L, H, D = shape.num_layers, shape.num_kv_heads, shape.head_dim
    k, v = draw(L, N, 1, H, D), draw(L, N, 1, H, D)
    _each(pools, lambda p: p.append(k, v))
    q = draw(N, shape.num_qo_heads, D)
    for layer in range(L):
        naive, shared = (p.manager.attention(q, p.seq_ids, layer) for p in pools)
        cmp.add(xp, naive, shared)


def _each(pools, fn) -> None:
    for p in pools:
        fn(p)
        p.record()


def _manager(sc: Scenario, mode: str, shape: KVShape, args) -> PagedAttentionManager:
    num_blocks = args.num_blocks or sc.blocks_needed(mode, args.block_size)
    return PagedAttentionManager.create(shape.num_layers, num_blocks, args.block_size, shape.num_kv_heads,
                                        shape.head_dim, args.dtype, args.device, kv_dtype=args.kv_cache_dtype)


# -- the same scenario through a real model -----------------------------------------------------------------
# NOTE: LLMEngine shares a prompt only between the n branches of one request, so this drives pagedkv.model's
# LlamaModel directly, the way the engine does: prefill (with a cached prefix), then batched decode steps.
def model_check(sc: Scenario, args, backend) -> dict:
    """Greedy tokens of a tiny random Llama through a naive and a shared pool: logits must be bit-identical.

    Both modes run the same computations in the same order (the prompt prefilled alone, each suffix prefilled
    after its cached prompt, then batched decode steps); only where the K/V lives differs: naive copies the
    prompt's blocks into every request's own blocks (``copy_blocks``), shared forks them.
    """
    try:
        from pagedkv.model import LlamaModel, get_config, random_weights
    except ImportError as exc:
        return {"ran": False, "why": f"pagedkv.model is not importable ({exc})"}
    total = sc.prompt_len + sc.suffix_len + sc.gen_len
    config = get_config("tiny", head_dim=64, max_position_embeddings=max(1024, total))
    dtype = args.dtype if backend.is_gpu else "float32"  # NOTE: NumPy has no fast float16 matmul
    model = LlamaModel(config, random_weights(config, seed=args.seed, dtype=dtype, device=backend), backend)
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, config.vocab_size, sc.prompt_len)
    suffixes = rng.integers(0, config.vocab_size, (sc.num_requests, sc.suffix_len))
    runs = {mode: _model_run(model, mode, sc, prompt, suffixes, args) for mode in ("naive", "shared")}
    (tok_a, logit_a, use_a), (tok_b, logit_b, use_b) = runs["naive"], runs["shared"]
    xp = backend.xp
    diff = max(float(xp.abs(a.astype(np.float32) - b.astype(np.float32)).max()) for a, b in zip(logit_a, logit_b))
    return {"ran": True, "model": f"tiny random Llama ({config.num_layers} layers, {config.num_heads} heads, "
                                   f"{config.num_kv_heads} KV heads, head_dim 64), {dtype}, greedy",
            "num_tokens": int(tok_a.size), "tokens_identical": bool((tok_a == tok_b).all()),
            "max_abs_logit_diff": diff, "identical": bool((tok_a == tok_b).all()) and diff == 0.0,
            "naive_used_blocks": use_a.num_used_blocks, "shared_used_blocks": use_b.num_used_blocks,
            "shared_cow_copies": use_b.num_cow_copies}


def _model_run(model, mode: str, sc: Scenario, prompt, suffixes, args):
    """Returns (tokens [num_requests, gen_len + 1], logits of every step, the pool's Usage at the end)."""
    c, xp = model.config, model.xp
    m = PagedAttentionManager(KVCache(c.num_layers, sc.blocks_needed(mode, args.block_size), args.block_size,
                                      c.num_kv_heads, c.head_dim, model.dtype, args.device, args.kv_cache_dtype))
    if mode == "shared":
        parent = m.add_sequence(sc.prompt_len)
        first = _prefill(model, m, parent, prompt, 0)
        seq_ids = [parent] * sc.parent_is_request + [m.fork_sequence(parent)
                                                      for _ in range(sc.num_requests - sc.parent_is_request)]
    else:  # each request gets its own blocks holding a physical copy of the prompt's K/V
        seq_ids = [m.add_sequence(sc.prompt_len) for _ in range(sc.num_requests)]
        first = _prefill(model, m, seq_ids[0], prompt, 0)
        for s in seq_ids[1:]:
            m.kv_cache.copy_blocks(m.block_table(seq_ids[0]), m.block_table(s))
    logits = [xp.concatenate([_suffix(model, m, s, x, sc) if sc.suffix_len else first
                              for s, x in zip(seq_ids, suffixes)])]
    tokens = [xp.argmax(logits[0], axis=-1).astype(np.int32)]
    for _ in range(sc.gen_len):
        logits.append(_decode(model, m, seq_ids, tokens[-1]))
        tokens.append(xp.argmax(logits[-1], axis=-1).astype(np.int32))
    return np.stack([np.asarray(to_numpy(t)) for t in tokens], axis=1), logits, m.usage()


def _suffix(model, m, seq_id, suffix, sc: Scenario):
    m.append_slots(seq_id, sc.suffix_len)  # copy-on-write of the prompt's partial last block happens here
    return _prefill(model, m, seq_id, suffix, sc.prompt_len)


def _prefill(model, m, seq_id, token_ids, start: int):
    from pagedkv.model import PrefillBatch

    n = len(token_ids)
    batch = PrefillBatch(token_ids=np.asarray(token_ids, dtype=np.int64), positions=np.arange(start, start + n),
                         slot_mapping=m.slots(seq_id, start, start + n), seq_lens=[n], num_cached=[start],
                         block_tables=[m.block_table(seq_id)])
    return model.prefill(batch, m.kv_cache)


def _decode(model, m, seq_ids, tokens):
    from pagedkv.model import DecodeBatch

    xp = model.xp
    slots = np.concatenate([m.append_slots(s, 1) for s in seq_ids])
    lens = m.context_lens(seq_ids)
    batch = DecodeBatch(token_ids=tokens, positions=xp.asarray(lens - 1), slot_mapping=xp.asarray(slots),
                        block_tables=xp.asarray(m.block_tables(seq_ids)), context_lens=xp.asarray(lens))
    return model.decode(batch, m.kv_cache)


# -- command line ------------------------------------------------------------------------------------------
# NOTE: sizes default per device: the CPU path computes every decode attention with the float64 reference,
# so its defaults are smaller (a bare run takes seconds there); on a GPU they are the GPU_DEFAULTS.
SIZE_FLAGS = ("num_requests", "num_branches", "prompt_len", "gen_len")
GPU_DEFAULTS = {"num_requests": 32, "num_branches": 8, "prompt_len": 1950, "gen_len": 16}
CPU_DEFAULTS = {"num_requests": 8, "num_branches": 4, "prompt_len": 490, "gen_len": 8}


def parse_args(argv=None):
    """Parse and check the flags that do not depend on the device (the rest: :func:`resolve`)."""
    p = cli.Parser(description="KV memory of naive copies vs a shared, forked prompt, measured from the pool.")
    size = lambda k: f"(default {GPU_DEFAULTS[k]} on a GPU, {CPU_DEFAULTS[k]} on the CPU)"  # noqa: E731
    p.add_argument("--num-requests", type=int, default=None,
                   help=f"requests sharing the prompt {size('num_requests')}; not vLLM's --num-prompts: every "
                        "request here has the same prompt")
    p.add_argument("--num-branches", type=int, default=None,
                   help=f"n of the parallel-sampling scenario {size('num_branches')}")
    p.add_argument("--prompt-len", type=int, default=None, help=f"shared prompt tokens {size('prompt_len')}")
    p.add_argument("--suffix-len", type=int, default=24, help="distinct tokens per request (default 24)")
    p.add_argument("--gen-len", type=int, default=None, help=f"generated tokens per request {size('gen_len')}")
    p.add_argument("--block-size", type=int, default=16, choices=BLOCK_SIZES, help="tokens per block (default 16)")
    p.add_argument("--num-gpu-blocks-override", dest="num_blocks", type=int, default=0, metavar="N",
                   help="blocks per pool; 0 = what each mode needs (default)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="the pools' element type (default auto: --dtype; fp8: quantized bytes, e4m3)")
    p.add_argument("--alloc-shape", default="auto", choices=ALLOC_SHAPES,
                   help="K/V shape allocated: auto (llama-1b on GPU, small on CPU) | small | llama-1b")
    p.add_argument("--skip-model-check", action="store_true",
                   help="skip the generated-token check with a tiny random Llama (pagedkv.model)")
    memory_beam.add_flags(p)
    cli.add_common(p, auto_dtype="float16")
    args = p.parse_args(argv)
    check_args(args)
    if args.plot:
        from . import plots

        plots.check_available()
    return args


def check_args(args) -> None:
    cli.check_common(args)
    for flag, lo, hi in (("--num-requests", 1, 4096), ("--num-branches", 1, 1024), ("--prompt-len", 1, 131072),
                         ("--suffix-len", 0, 4096), ("--gen-len", 1, 4096)):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            cli.in_range(flag, value, lo, hi)
    cli.in_range("--num-gpu-blocks-override", args.num_blocks, 0, 10**7)
    memory_beam.check_flags(args, cli.in_range)


def resolve(args, backend) -> KVShape:
    """Fill the device's default sizes, check the pool flags against them and the memory the run needs;
    returns the K/V shape to allocate."""
    args.device = backend.name
    for key in SIZE_FLAGS:
        if getattr(args, key) is None:
            setattr(args, key, (GPU_DEFAULTS if backend.is_gpu else CPU_DEFAULTS)[key])
    if args.num_blocks:
        pool_tokens = args.num_blocks * args.block_size
        cli.in_range("--prompt-len", args.prompt_len, 1, pool_tokens,
                     f" (the pool holds {args.num_blocks} blocks x {args.block_size} tokens)")
        need = max(sc.blocks_needed("naive", args.block_size) for sc in scenarios(args))
        cli.in_range("--num-gpu-blocks-override", args.num_blocks, need, 10**7, " (what the naive mode needs; 0 = auto)")
    shape = {"small": SMALL, "llama-1b": LLAMA_1B}.get(args.alloc_shape, LLAMA_1B if backend.is_gpu else SMALL)
    cli.require_memory(backend=backend, **memory_needed(args, shape, backend))
    return shape


def memory_needed(args, shape: KVShape, backend) -> dict:
    """Bytes the run allocates at once (the larger scenario): both pools, the K/V drawn for them, and the
    model check's pools; on a GPU all of it is device memory."""
    item = dtype_of(args.dtype).itemsize
    per_block = shape.bytes_per_block(args.block_size, args.dtype, args.kv_cache_dtype)
    pools = draws = check = 0
    tiny = KVShape("tiny", 2, 2, 64, 4)
    for sc in scenarios(args):
        blocks = sum(args.num_blocks or sc.blocks_needed(m, args.block_size) for m in ("naive", "shared"))
        pools = max(pools, blocks * per_block)
        elems = shape.num_layers * shape.num_kv_heads * shape.head_dim * (sc.prompt_len + sc.num_requests *
                                                                          max(sc.suffix_len, 1))
        draws = max(draws, 2 * elems * (item + 4))  # K and V, drawn in float32 then cast
        if not args.skip_model_check:
            blocks = sum(sc.blocks_needed(m, args.block_size) for m in ("naive", "shared"))
            check = max(check, blocks * tiny.bytes_per_block(args.block_size, "float32"))
    parts = {"KV pools": pools, "K/V drawn": draws, "model check (after them)": check}
    total = max(pools + draws, check)
    return {"device": total, "host": 0, "parts": parts} if backend.is_gpu else {"host": total, "parts": parts}


def scenarios(args) -> list[Scenario]:
    return [Scenario("shared-prompt", args.num_requests, args.prompt_len, args.suffix_len, args.gen_len, False),
            Scenario("parallel-sampling", args.num_branches, args.prompt_len, 0, args.gen_len, True)]


def identical(r: dict) -> bool:
    """Attention outputs identical, and the model's tokens and logits too when that check ran."""
    mc = r.get("model_check", {})
    return r["outputs"]["identical"] and (not mc.get("ran") or mc["identical"])


def verdict(r: dict) -> str:
    sc, out, mc = r["scenario"], r["outputs"], r.get("model_check", {})
    what = (f"{sc['num_requests']} requests x ({sc['prompt_len']} shared + {sc['suffix_len']} own + "
            f"{sc['gen_len']} generated tokens)" if sc["suffix_len"] else
            f"{sc['num_requests']} branches x ({sc['prompt_len']} prompt + {sc['gen_len']} generated tokens)")
    how = f"{out['num_outputs']:,} decode attention outputs bit for bit"
    if mc.get("ran"):
        how += f"; {mc['num_tokens']:,} greedy tokens of a tiny random Llama, logits bit for bit"
    same = f"outputs identical ({how})" if identical(r) else f"OUTPUTS DIFFER (checked: {how}; see the JSON)"
    return (f"{sc['name']}, {what}: naive {fmt_bytes(r['naive']['bytes_used'])}, "
            f"shared {fmt_bytes(r['shared']['bytes_used'])}: {r['saved_pct']:.1f}% saved, {same}")


def render_table(payload: dict):
    from rich.table import Table

    rep = payload["reported_shape"]
    t = Table(title="KV memory: naive copies vs shared prompt (fork + copy-on-write)",
              caption=_bytes_note(payload))
    for col in ("scenario", "mode", "blocks used", "peak blocks", f"memory ({rep['name']} {rep['dtype']})",
                "fp8 memory", "saved", "CoW copies", "shared blocks", "outputs"):
        t.add_column(col, justify="left" if col in ("scenario", "mode", "outputs") else "right")
    for r in payload["scenarios"]:
        for mode in ("naive", "shared"):
            m = r[mode]
            t.add_row(r["scenario"]["name"] if mode == "naive" else "", mode, f"{m['num_used_blocks']:,}",
                      f"{m['peak_used_blocks']:,}", fmt_bytes(m["bytes_used"]), fmt_bytes(m["bytes_used_fp8"]),
                      f"{r['saved_pct']:.1f}%" if mode == "shared" else "", f"{m['num_cow_copies']:,}",
                      f"{m['num_shared_blocks']:,}",
                      ("identical" if identical(r) else "DIFFER") if mode == "shared" else "")
    return t


def _bytes_note(payload: dict) -> str:
    a, rep = payload["allocated_shape"], payload["reported_shape"]
    note = f"memory = blocks x {rep['bytes_per_block'] // 1024} KiB/block of {rep['label']}"
    if a["name"] == rep["name"]:
        note += ", the shape really allocated in this run"
    else:
        note += (f"; the pools really allocated here hold {a['label']}, {a['bytes_per_block'] // 1024} KiB/block "
                 f"(block counts are the same for any shape)")
    return note


def _shape_info(shape: KVShape, args) -> dict:
    return {**asdict(shape), "dtype": args.dtype, "label": shape.label(args.dtype),
            "bytes_per_block": shape.bytes_per_block(args.block_size, args.dtype),
            "kv_cache_dtype": args.kv_cache_dtype,
            "bytes_per_block_fp8": shape.bytes_per_block(args.block_size, args.dtype, "fp8")}


@cli.guarded
def main(argv=None) -> int:
    from rich.console import Console
    from rich.progress import Progress

    args = parse_args(argv)
    backend = cli.resolve_backend(args.device)
    shape = resolve(args, backend)
    start = time.perf_counter()
    with Progress(console=Console(stderr=True), transient=True) as progress:
        results = [run_scenario(sc, shape, args, backend, progress) for sc in scenarios(args)]
    for sc, r in zip(scenarios(args), results):
        r["model_check"] = ({"ran": False, "why": "--skip-model-check"} if args.skip_model_check
                            else model_check(sc, args, backend))
        if r["model_check"]["ran"]:  # the same token counts must take the same blocks, whatever the K/V
            assert r["model_check"]["naive_used_blocks"] == r["naive"]["num_used_blocks"]
            assert r["model_check"]["shared_used_blocks"] == r["shared"]["num_used_blocks"]
    report_bytes = LLAMA_1B.bytes_per_block(args.block_size, args.dtype)
    memory_beam.resolve(args, backend)
    beams = [memory_beam.run_beam_scenario(sc, args, backend, report_bytes) for sc in memory_beam.scenarios(args)]
    payload = {"experiment": "memory_share", "run": cli.run_info(backend), "config": vars(args),
               "allocated_shape": _shape_info(shape, args), "reported_shape": _shape_info(LLAMA_1B, args),
               "scenarios": results, "beam_search": beams,
               "verdicts": [verdict(r) for r in results] + [memory_beam.verdict(r, fmt_bytes) for r in beams],
               "elapsed_s": round(time.perf_counter() - start, 2)}
    return report(payload, args, "memory_share", backend)


def report(payload: dict, args, experiment: str, backend) -> int:
    console = cli.console()
    console.print(render_table(payload))
    if payload["beam_search"]:
        console.print(memory_beam.render_table(payload["beam_search"]))
    for line in payload["verdicts"]:
        console.print(line, soft_wrap=True)
    if args.json:
        console.print(f"wrote {cli.write_json(args.json, payload)}", soft_wrap=True)
    if args.plot:
        from . import plots

        console.print(f"wrote {plots.memory_share(payload, args.plot)}", soft_wrap=True)
    same = all(identical(r) for r in payload["scenarios"]) and all(r["identical"] for r in payload["beam_search"])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
