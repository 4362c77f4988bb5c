"""cascade_workloads: issue 17's engine figures, cascade attention on vs off in the same run (llama-1b preset,
random weights, float16, CUDA graphs on a GPU). Run through ``python -m experiments.prefix_workloads --workload
cascade`` (its flags) or directly.

    shared     N requests x (shared document + own tokens) -> G tokens each, greedy, ignore_eos: prefix caching
               on with cascade on, the same engine with cascade off, and caching off (fresh engine) ->
               requests/s, decode step GPU time at full batch vs its floor (weight bytes + K/V bytes with the
               shared prefix read once, over the measured read ceiling), greedy outputs identical on vs off
    parallel   P prompts of L tokens, n = 16 sampled branches each (seeded), T tokens per branch: decode tokens/s
               with cascade on vs off (the same engine)
    w1         engine_bench's W1 (no sharing: the rule never fires) with cascade on vs off: requests/s

A library of ``python -m experiments.prefix_workloads --workload cascade [flags]`` (its one entry point, so the
flags are parsed and checked in one place). Cascade on/off is the attention backend's switch (``model.attention.cascade.enabled``) on one engine, so both runs use the
same weights, pool and captured graphs.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

PARALLEL_DEFAULTS = dict(gpu=dict(prompts=8, prompt_len=2048, n=16, tokens=256),
                         cpu=dict(prompts=2, prompt_len=40, n=4, tokens=6))


def _sync(engine):
    if engine.backend.is_gpu:
        engine.backend.xp.cuda.get_current_stream().synchronize()


def timed_run(engine, prompts, params) -> tuple[dict, list]:
    """``engine.generate`` of every request (the offline API: outputs are built once, at the end), timed; figures,
    each request's branches' tokens, and the GPU time of every step that advanced every request (the decode
    steps at full batch).

    NOTE: ``engine.step()`` builds a RequestOutput of every advanced request per step, a copy of its prompt
    included: with 256 prompts of 4k tokens that host work (~20 ms a step on the H100 host, device call 2) hid
    the decode step entirely, for cascade on and off alike."""
    engine.runner.record_gpu_time = engine.backend.is_gpu
    cascade_before = engine.model.attention.cascade.num_cascade_steps
    before = engine.metrics().as_dict()
    full_steps, step = [], engine._step

    def recording_step():  # the GPU time of each full-batch step (one attribute read per step)
        advanced = step()
        gpu_s = engine.last_step_timing.gpu_s
        if gpu_s is not None and len(advanced) == len(prompts):
            full_steps.append(gpu_s)
        return advanced
    engine._step = recording_step
    try:
        _sync(engine)
        start = time.perf_counter()
        outs = engine.generate(prompts, params, progress=False)
        _sync(engine)
        wall = time.perf_counter() - start
    finally:
        del engine._step  # back to the class's method
    after = engine.metrics().as_dict()
    delta = {k: after[k] - before[k] for k in ("num_steps", "num_prefill_tokens", "num_decode_tokens",
                                               "num_generated_tokens", "prefill_time_s", "decode_time_s")}
    figures = {"num_requests": len(prompts), "wall_s": wall, "requests_per_s": len(prompts) / wall, **delta,
               "decode_tokens_per_s": delta["num_decode_tokens"] / max(delta["decode_time_s"], 1e-9),
               "full_batch_step_gpu_s": float(np.median(full_steps)) if full_steps else None,
               "num_full_batch_steps": len(full_steps),
               "cascade_steps": engine.model.attention.cascade.num_cascade_steps - cascade_before,
               "graph_error": engine.graph_error}
    return figures, [[c.token_ids for c in o.outputs] for o in outs]


def _warm(engine):
    from pagedkv.engine import SamplingParams

    engine.generate([[1, 2, 3, 4, 5]] * 2, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                    progress=False)
    engine.warmup_graphs()


def drop_prefix_cache(engine) -> None:
    """Forget every cached block of an idle engine (each taken from the pool and given back: hashes dropped), so
    a second run of the same prompts computes them again."""
    bm = engine.manager.block_manager
    if bm.num_evictable_blocks:
        bm.free(bm.allocate(bm.num_free_blocks))


def _on_off(engine, prompts, params) -> tuple[dict, dict]:
    """The same requests with cascade on, then off (one engine, the prefix cache emptied before each run);
    figures and tokens by mode. An untimed pass over an eighth of the requests (2 tokens each) first: in device
    call 2 the first timed mode paid the pools' growth (W1: the same GPU step time, 13 % less requests/s)."""
    from pagedkv.engine import SamplingParams

    head = max(2, len(prompts) // 8)
    engine.generate(prompts[:head], [SamplingParams(**{**_params_dict(p), "max_tokens": 2}) for p in params[:head]],
                    progress=False)
    out, tokens = {}, {}
    for name, enabled in (("cascade_on", True), ("cascade_off", False)):
        print(f"  {name} ...", flush=True)
        engine.model.attention.cascade.enabled = enabled
        drop_prefix_cache(engine)
        out[name], tokens[name] = timed_run(engine, prompts, params)
    engine.model.attention.cascade.enabled = True
    return out, tokens


def _params_dict(p) -> dict:
    return {k: getattr(p, k) for k in ("temperature", "top_p", "n", "seed", "max_tokens", "ignore_eos")}


def read_ceiling_gbps(engine) -> float | None:
    """The device's read ceiling (kernel_bench's read-only reduction over 4 GiB); None on the CPU."""
    if not engine.backend.is_gpu:
        return None
    import cupy

    from pagedkv.kernels import compile as kcompile

    from .kernel_bench import FLUSH_BYTES, Timer, ceilings, make_read_kernel

    read = make_read_kernel(cupy, kcompile.num_sms(cupy.cuda.Device().id))
    timer = Timer(cupy, read, cupy.ones(FLUSH_BYTES // 4, dtype=cupy.int32))
    gbps = ceilings(cupy, timer, read)["read_GBps"]
    cupy.get_default_memory_pool().free_all_blocks()
    return gbps


def step_floor_s(engine, num_requests: int, shared_len: int, own_len: int, output_len: int, gbps: float) -> dict:
    """The decode step's floor at the middle of the decode phase: weight bytes + K/V bytes (each whole shared
    block once, every request's own tokens once) over the read ceiling."""
    w = engine.model.weights
    weight_bytes = w.num_bytes() - (0 if w.tied else int(w.embed.nbytes))  # a decode step gathers rows of embed
    c, bs = engine.model_config, engine.config.block_size
    shared = shared_len // bs * bs
    own = shared_len + own_len + output_len // 2 - shared
    token_bytes = c.num_layers * c.num_kv_heads * c.head_dim * 2 * np.dtype(engine.model.dtype).itemsize
    kv_bytes = (shared + num_requests * own) * token_bytes
    return {"weight_bytes": weight_bytes, "kv_bytes_read_once": kv_bytes, "read_GBps": gbps,
            "floor_s": (weight_bytes + kv_bytes) / (gbps * 1e9)}


def shared(args, make_engine) -> dict:
    from pagedkv.engine import SamplingParams

    rng = np.random.default_rng(args.seed)
    vocab = _vocab(args)
    doc = rng.integers(0, vocab, args.shared_len).tolist()
    prompts = [doc + rng.integers(0, vocab, args.own_len).tolist() for _ in range(args.num_prompts)]
    params = [SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)] * len(prompts)
    max_len = args.shared_len + args.own_len + args.output_len
    batched = max(8192, max_len)
    engine = make_engine(args, max_len, enable_prefix_caching=True, max_num_batched_tokens=batched)
    _warm(engine)
    out, tokens = _on_off(engine, prompts, params)
    gbps = read_ceiling_gbps(engine)
    if gbps:
        out["floor"] = step_floor_s(engine, len(prompts), args.shared_len, args.own_len, args.output_len, gbps)
    del engine
    print("  caching_off ...", flush=True)
    off = make_engine(args, max_len, enable_prefix_caching=False, max_num_batched_tokens=batched)
    _warm(off)
    out["caching_off"], tokens["caching_off"] = timed_run(off, prompts, params)
    on, cold = out["cascade_on"], out["caching_off"]
    step = on["full_batch_step_gpu_s"]
    out["targets"] = {
        "requests_per_s_vs_caching_off": on["requests_per_s"] / cold["requests_per_s"],  # >= 10
        "decode_step_vs_floor": step / out["floor"]["floor_s"] if gbps and step else None,  # <= 1.3
        "requests_per_s_cascade_vs_not": on["requests_per_s"] / out["cascade_off"]["requests_per_s"],
        "greedy_identical_on_vs_off": sum(a == b for a, b in zip(tokens["cascade_on"], tokens["cascade_off"])),
        "greedy_identical_on_vs_caching_off": sum(a == b for a, b in zip(tokens["cascade_on"], tokens["caching_off"])),
    }
    return out


def parallel(args, make_engine) -> dict:
    from pagedkv.engine import SamplingParams

    d = PARALLEL_DEFAULTS["gpu" if args.device == "gpu" else "cpu"]
    rng = np.random.default_rng(args.seed + 2)
    vocab = _vocab(args)
    prompts = [rng.integers(0, vocab, d["prompt_len"]).tolist() for _ in range(d["prompts"])]
    params = [SamplingParams(temperature=0.8, top_p=0.95, n=d["n"], seed=i, max_tokens=d["tokens"], ignore_eos=True)
              for i in range(len(prompts))]
    engine = make_engine(args, d["prompt_len"] + d["tokens"], enable_prefix_caching=True,
                         max_num_batched_tokens=max(8192, d["prompt_len"] + d["tokens"]))
    _warm(engine)
    out, tokens = _on_off(engine, prompts, params)
    out["setup"] = d
    out["targets"] = {
        "decode_tokens_per_s_on_vs_off": out["cascade_on"]["decode_tokens_per_s"] /
        out["cascade_off"]["decode_tokens_per_s"],  # >= 2
        "requests_identical_on_vs_off": sum(a == b for a, b in zip(tokens["cascade_on"], tokens["cascade_off"])),
    }
    return out


def w1(args) -> dict:
    from pagedkv.engine import SamplingParams
    from pagedkv.model import get_config

    from . import engine_bench as eb

    w1_args = SimpleNamespace(**{**vars(args), "max_len": 2 * eb.LEN_RANGE[1] if args.device == "gpu"
                                 else eb.CPU_MAX_LEN})
    num = eb.NUM_REQUESTS if args.device == "gpu" else 8
    prompts, lens = eb.workload(num, get_config(args.model).vocab_size, w1_args.max_len, 0)
    engine = eb.make_engine(w1_args, "continuous", args.device == "gpu" and not args.enforce_eager)
    _warm(engine)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens]
    out, tokens = _on_off(engine, prompts, params)
    out["targets"] = {"requests_per_s_on_vs_off": out["cascade_on"]["requests_per_s"] /
                      out["cascade_off"]["requests_per_s"],  # >= ~1 (not slower)
                      "greedy_identical_on_vs_off": sum(a == b for a, b in zip(tokens["cascade_on"],
                                                                                  tokens["cascade_off"]))}
    return out


def run_all(args, make_engine, which=("shared", "parallel", "w1"), sink=None) -> dict:
    """The workloads in ``which``; ``sink(result)`` after each (a cut-off run keeps what it measured)."""
    result = {}
    for name in which:
        print(f"cascade: {name} ...", flush=True)
        result[name] = shared(args, make_engine) if name == "shared" else parallel(args, make_engine) \
            if name == "parallel" else w1(args)
        if sink is not None:
            sink(result)
    return result


def _vocab(args) -> int:
    from pagedkv.model import get_config

    return get_config(args.model).vocab_size
