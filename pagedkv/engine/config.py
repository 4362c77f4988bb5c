"""EngineConfig: model, dtype, device, KV pool size and the scheduler's limits in one value, validated."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..backend import DEVICES, dtype_of
from ..fp8 import resolve_kv_cache_dtype
from ..model.config import PRESETS, ModelConfig
from ..model.host_matmul import HOST_MATMULS
from .sched.scheduler import MODES, SchedulerConfig


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_id(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 0


@dataclass(slots=True)
class EngineConfig:
    """How an :class:`~pagedkv.engine.LLMEngine` is built. Every field is checked for type and range.

    The KV pool is sized by ``num_blocks`` or by ``kv_memory_bytes`` (K and V of every layer), never both;
    with neither, 1024 blocks on the CPU and 40% of the free GPU memory on a GPU.
    ``dtype`` None: the weights' own (a checkpoint's ``torch_dtype``; float32 for random weights).
    ``max_model_len`` None: the model's ``max_position_embeddings``, bounded by what the pool can hold for one
    sequence (minus the watermark). ``eos_token_id``: one id or several (Llama 3 lists a few); None: none.
    ``scheduling`` is ``"continuous"`` (iteration-level batching, preemption by recompute) or ``"static"``
    (fixed batches in arrival order, memory reserved up front: see :mod:`pagedkv.engine.sched.scheduler`).
    ``enable_chunked_prefill``: a prompt longer than what is left of a step's ``max_num_batched_tokens`` is
    prefilled over several steps (off: a prompt is prefilled whole, so ``max_num_batched_tokens`` must be at
    least ``max_model_len``). ``enable_prefix_caching``: a new sequence starts on the longest run of cached full
    blocks of its tokens (continuous scheduling; see :mod:`pagedkv.engine.sched.prefix_cache`).
    ``async_scheduling``: each step call launches the next step before waiting for the current one's tokens
    (see :mod:`pagedkv.engine.engine`); None: on when the model runs on a GPU (on the CPU the forward runs
    while it is launched, so there is nothing to overlap).
    ``kv_cache_dtype`` (vLLM's values): ``"auto"`` stores K/V in the model's dtype; ``"fp8"`` / ``"fp8_e4m3"`` /
    ``"fp8_e5m2"`` in fp8 bytes (half of float16: ``kv_memory_bytes`` holds twice the blocks) with per-layer
    scales, 1.0 unless a checkpoint carries ``k_scale`` / ``v_scale`` tensors or ``calculate_kv_scales`` is on
    (scale = amax / the format's max over the first step's prompts, set before any CUDA graph is captured).
    ``cascade_attention``: decode steps whose rows share long prefixes read each shared prefix once per group
    where the rule of :mod:`pagedkv.cascade` says it pays; None: on for float16 / bfloat16 models on a GPU.
    ``tensor_core_decode``: decode steps run decode version 4 (tensor cores) where
    :func:`pagedkv.kernels.decode.choose_version` says it beats the default kernel for the step's lengths (GPU,
    float16 / bfloat16 models of head_dim 64 / 128 with 2-8 query heads per KV head; one more set of decode
    CUDA graphs); False (the default until the choice is timed against W1, CHANGELOG stop 26): always the
    default kernel.
    ``tensor_parallel_size`` > 1: the model is split over that many ranks (Megatron-style: heads and MLP
    columns); in this build the ranks are threads of this process (:mod:`pagedkv.model.parallel_model`), each
    with a pool of its KV heads whose size ``num_blocks`` / ``kv_memory_bytes`` gives per rank; without CUDA
    graphs. One process per GPU over NCCL is not built yet.
    """

    model: str | ModelConfig = "tiny"
    dtype: str | None = None
    device: str = "auto"
    seed: int = 0  # random weights
    block_size: int = 16
    num_blocks: int | None = None
    kv_memory_bytes: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    scheduling: str = "continuous"
    watermark: float = 0.01
    static_padding: bool = True  # static: every request of a batch reserves the batch's longest length
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    eos_token_id: int | tuple[int, ...] | None = None
    record_steps: bool = False  # keep a StepMetrics per step, with the pool's exact slot usage
    fused: bool = True  # fused elementwise GPU kernels (self-checked; falls back when they fail)
    cuda_graph: bool = False  # GPU: replay the decode forward as a CUDA graph per padded batch size
    async_scheduling: bool | None = None  # launch step N+1 before retiring step N (None: on a GPU only)
    tensor_parallel_size: int = 1  # ranks the model's heads and MLP are split over (pagedkv.model.parallel_model)
    kv_cache_dtype: str = "auto"  # "auto" | "fp8" | "fp8_e4m3" | "fp8_e5m2"
    calculate_kv_scales: bool = False  # fp8: K/V scales from the first prompts' amax (vLLM's name)
    gpu_memory_utilization: float | None = None  # GPU: share of total memory for the process (vLLM's meaning)
    host_matmul: str = "float64"  # CPU matmuls: "float64" (batch-invariant) or "float32" (BLAS, fast)
    max_stop_strings: int = 128  # stop strings per request (more: ValueError); the server's limit too
    max_stop_string_len: int = 512  # characters per stop string
    cascade_attention: bool | None = None  # shared prefixes read once per decode step (None: GPU, 16-bit dtypes)
    tensor_core_decode: bool = False  # decode version 4 on the steps where it pays (decode.choose_version)

    def __post_init__(self):
        if not isinstance(self.model, ModelConfig) and not (isinstance(self.model, str) and self.model in PRESETS):
            raise ValueError(f"model must be a preset name {sorted(PRESETS)} or a ModelConfig, got {self.model!r}")
        if self.dtype is not None:
            dtype_of(self.dtype)  # raises ValueError naming the dtype
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        if not _is_int(self.block_size) or not 1 <= self.block_size <= 1024 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two in [1, 1024], got {self.block_size!r}")
        u = self.gpu_memory_utilization
        if u is not None and (isinstance(u, bool) or not isinstance(u, (int, float)) or not math.isfinite(u)
                              or not 0 < u <= 1):
            raise ValueError(f"gpu_memory_utilization must be None or a number in (0, 1], got {u!r}")
        if self.host_matmul not in HOST_MATMULS:
            raise ValueError(f"host_matmul must be one of {HOST_MATMULS}, got {self.host_matmul!r}")
        for name in ("max_stop_strings", "max_stop_string_len"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("num_blocks", "kv_memory_bytes", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        if self.num_blocks is not None and self.kv_memory_bytes is not None:
            raise ValueError("give num_blocks or kv_memory_bytes, not both")
        resolve_kv_cache_dtype(self.kv_cache_dtype)  # raises ValueError naming the value and the choices
        for name in ("static_padding", "enable_chunked_prefill", "enable_prefix_caching", "record_steps", "fused",
                     "cuda_graph", "calculate_kv_scales"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not _is_int(self.tensor_parallel_size) or not 1 <= self.tensor_parallel_size <= 64:
            raise ValueError(f"tensor_parallel_size must be an int in [1, 64], got {self.tensor_parallel_size!r}")
        if self.tensor_parallel_size > 1 and self.cuda_graph:
            raise ValueError("cuda_graph=True with tensor_parallel_size > 1: the ranks run as threads of one process "
                             "here, without CUDA graphs; set cuda_graph=False (enforce_eager)")
        if self.tensor_parallel_size > 1 and self.kv_cache_dtype != "auto":
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} with tensor_parallel_size > 1 is not built yet "
                             "(the ranks' pools are in the model's dtype)")
        for name in ("async_scheduling", "cascade_attention"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be None or a bool, got {getattr(self, name)!r}")
        if not isinstance(self.tensor_core_decode, bool):
            raise ValueError(f"tensor_core_decode must be a bool, got {self.tensor_core_decode!r}")
        w = self.watermark
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or not 0 <= w < 1:
            raise ValueError(f"watermark must be a number in [0, 1), got {w!r}")
        self.eos_token_id = _eos_ids(self.eos_token_id)
        self.scheduler_config(self.max_model_len or 1)  # validates the limits and the mode

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.eos_token_id or ())

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        """The scheduler's limits, with ``max_model_len`` resolved by the engine."""
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                               max_model_len=max_model_len, mode=self.scheduling, watermark=float(self.watermark),
                               static_padding=self.static_padding, enable_chunked_prefill=self.enable_chunked_prefill)


def _eos_ids(value) -> tuple[int, ...] | None:
    """None, one id or a sequence of ids → None or a tuple of non-negative ints."""
    if value is None:
        return None
    ids = (value,) if isinstance(value, (int, np.integer)) else value
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ValueError(f"eos_token_id must be an int, a sequence of ints or None, got {value!r}")
    ids = tuple(ids)
    if not all(_is_token_id(t) for t in ids):
        raise ValueError(f"eos_token_id must hold non-negative ints, got {value!r}")
    return tuple(int(t) for t in ids)


__all__ = ["MODES", "EngineConfig"]
