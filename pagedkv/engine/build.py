"""What an engine is built from: the KV pool's size, the longest sequence it serves, a checkpoint's generation
settings (EOS ids, default sampling parameters)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..backend import dtype_of
from ..cache.kv_cache import KVCache
from ..model.config import ModelConfig
from ..model.generation_config import read_generation_config
from ..sampling_params import SamplingParams
from .config import EngineConfig

CPU_DEFAULT_BLOCKS = 1024
GPU_FREE_MEMORY_SHARE = 0.4


def build_kv_cache(config: EngineConfig, model: ModelConfig, dtype, backend, kv_scales=None) -> KVCache:
    """The pool from ``num_blocks``, or ``kv_memory_bytes``, or a default (1024 blocks on the CPU, 40% of the
    free GPU memory), in ``config.kv_cache_dtype``; ``kv_scales``: ``(k_scales, v_scales)`` per layer (fp8)."""
    k_scales, v_scales = (1.0, 1.0) if kv_scales is None else kv_scales
    if config.kv_cache_dtype != "auto" and backend.is_gpu and dtype_of(dtype).itemsize != 2:
        raise ValueError(f"kv_cache_dtype={config.kv_cache_dtype!r} on a GPU needs a float16 or bfloat16 model, "
                         f"got {dtype_of(dtype)}")
    shape = dict(num_layers=model.num_layers, block_size=config.block_size, num_kv_heads=model.num_kv_heads,
                 head_dim=model.head_dim, dtype=dtype, device=backend.name, kv_dtype=config.kv_cache_dtype,
                 k_scales=k_scales, v_scales=v_scales)
    budget = config.kv_memory_bytes
    if config.num_blocks is None and budget is None:
        if not backend.is_gpu:
            return KVCache(num_blocks=CPU_DEFAULT_BLOCKS, **shape)
        free, total = backend.xp.cuda.Device().mem_info
        budget = int(GPU_FREE_MEMORY_SHARE * free)
        if config.gpu_memory_utilization is not None:  # vLLM: the process's share of the whole GPU
            budget = int(free - (1 - config.gpu_memory_utilization) * total)
            if budget <= 0:
                raise ValueError(f"gpu_memory_utilization={config.gpu_memory_utilization} leaves no memory for the "
                                 f"KV cache ({total - free} of {total} bytes are in use already)")
    if budget is not None:
        _check_host_memory(budget, "kv_memory_bytes", backend)
        return KVCache.from_memory_budget(budget, **shape)
    per_block = KVCache.block_bytes(model.num_layers, config.block_size, model.num_kv_heads, model.head_dim, dtype)
    _check_host_memory(config.num_blocks * per_block, f"num_blocks={config.num_blocks} ×", backend)
    return KVCache(num_blocks=config.num_blocks, **shape)


def host_memory_bytes() -> int | None:
    """Physical memory of this host in bytes (None where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_host_memory(nbytes: int, what: str, backend) -> None:
    """A CPU pool larger than the host's memory is a caller's mistake: refused naming the size."""
    total = None if backend.is_gpu else host_memory_bytes()
    if total is not None and nbytes > total:
        raise ValueError(f"{what} asks for a KV pool of {nbytes} bytes but this host has {total} bytes of memory")


def build_model(config: EngineConfig, model: ModelConfig, weights, dtype, backend, kv_scales=None):
    """``(model, kv_cache, max_model_len)``: one :class:`~pagedkv.model.LlamaModel` and its pool, or with
    ``tensor_parallel_size`` > 1 a :class:`~pagedkv.model.parallel_model.ParallelModel` whose ranks each hold a
    pool of ``num_blocks`` blocks over their KV heads (the pool's size applies per rank). ``kv_scales``: an fp8
    pool's per-layer ``(k_scales, v_scales)``."""
    from ..model import LlamaModel

    tp = config.tensor_parallel_size
    if tp == 1:
        kv_cache = build_kv_cache(config, model, dtype, backend, kv_scales)
        max_model_len = resolve_max_model_len(config, model, kv_cache.num_blocks)
        return (LlamaModel(model, weights, backend, max_positions=max_model_len, fused=config.fused,
                           host_matmul=config.host_matmul), kv_cache,
                max_model_len)
    from ..model.parallel_model import ParallelModel
    from ..model.tensor_parallel import TensorParallelPlan

    rank0 = build_kv_cache(config, TensorParallelPlan(model, tp, 0).local_config(), dtype, backend)
    max_model_len = resolve_max_model_len(config, model, rank0.num_blocks)
    parallel = ParallelModel(model, weights, backend, tp, max_positions=max_model_len, fused=config.fused,
                             host_matmul=config.host_matmul)
    kv_cache = parallel.make_kv_cache(rank0.num_blocks, config.block_size, dtype, backend.name, first=rank0)
    return parallel, kv_cache, max_model_len


def resolve_max_model_len(config: EngineConfig, model: ModelConfig, num_blocks: int) -> int:
    """``config.max_model_len``, checked against the model's positions and the pool (one sequence alone, minus
    the watermark), or by default the largest both allow (and, without chunked prefill, the token budget)."""
    usable = (num_blocks - int(config.watermark * num_blocks)) * config.block_size
    if config.max_model_len is None:
        longest = min(model.max_position_embeddings, usable)
        return longest if config.enable_chunked_prefill else min(longest, config.max_num_batched_tokens)
    if config.max_model_len > model.max_position_embeddings:
        raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's max_position_embeddings="
                         f"{model.max_position_embeddings}")
    if config.max_model_len > usable:
        raise ValueError(f"max_model_len={config.max_model_len} exceeds what the KV pool holds for one sequence "
                         f"({usable} token slots: {num_blocks} blocks of {config.block_size}, minus the watermark)")
    return config.max_model_len


@dataclass(slots=True)
class Generation:
    """A checkpoint's generation settings: EOS ids, and default sampling parameters (SamplingParams names)."""

    eos_token_ids: tuple[int, ...] = ()
    defaults: dict = field(default_factory=dict)


def read_generation(folder) -> Generation:
    """EOS ids and defaults through the loader's ``read_generation_config`` (config.json, then
    generation_config.json)."""
    g = read_generation_config(folder)
    return Generation(tuple(g.eos_token_ids), dict(g.defaults))


def default_params(defaults: dict, source) -> SamplingParams:
    """SamplingParams from a checkpoint's defaults (unknown names ignored); bad values raise ``ValueError``."""
    names = {f.name for f in fields(SamplingParams)}
    try:
        return SamplingParams(**{k: v for k, v in defaults.items() if k in names})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: generation defaults {defaults!r} are not valid sampling parameters: "
                         f"{exc}") from None
