"""EngineConfig: model, dtype, device, KV pool size and the scheduler's limits in one value."""
from __future__ import annotations

from dataclasses import dataclass

from ..model.config import ModelConfig
from .scheduler import MODES, SchedulerConfig


@dataclass(slots=True)
class EngineConfig:
    """How an :class:`~pagedkv.engine.LLMEngine` is built.

    The KV pool is sized by ``num_blocks`` or by ``kv_memory_bytes`` (K and V of every layer), never both;
    with neither, 1024 blocks on the CPU and 40% of the free GPU memory on a GPU.
    ``scheduling`` is ``"continuous"`` (iteration-level batching, preemption by recompute) or ``"static"``
    (fixed batches in arrival order, memory reserved up front: see :mod:`pagedkv.engine.scheduler`).
    """

    model: str | ModelConfig = "tiny"
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0  # random weights
    block_size: int = 16
    num_blocks: int | None = None
    kv_memory_bytes: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    scheduling: str = "continuous"
    watermark: float = 0.01
    static_padding: bool = True  # static: every request of a batch reserves the batch's longest length
    eos_token_id: int | None = None
    record_steps: bool = False  # keep a StepMetrics per step, with the pool's exact slot usage
    fused: bool = True  # fused elementwise GPU kernels (self-checked; falls back when they fail)
    cuda_graph: bool = False  # GPU: replay the decode forward as a CUDA graph per padded batch size

    def __post_init__(self):
        if self.num_blocks is not None and self.kv_memory_bytes is not None:
            raise ValueError("give num_blocks or kv_memory_bytes, not both")
        if self.scheduling not in MODES:
            raise ValueError(f"scheduling must be one of {MODES}, got {self.scheduling!r}")
        self.scheduler_config()  # validates the limits

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                               max_model_len=self.max_model_len, mode=self.scheduling, watermark=self.watermark,
                               static_padding=self.static_padding)
