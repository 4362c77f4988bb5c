"""Launcher of ``kernels_cu/prefill_attention_sm90.cu``: versions 4 and 5 of causal prefill attention, the
Hopper kernels (warp-specialized wgmma, FlashAttention-3 structure; sm_90a, float16 / bfloat16, head_dim 64 /
128). Version 4: one thread block per work item; version 5: persistent, faster softmax. The default per
head_dim (:data:`DEFAULT_VERSION`) is the faster one on the benchmark (kernels_cu/NOTES_prefill.md).

It takes arrays already checked by :func:`pagedkv.kernels.prefill.prefill_attention` (which dispatches here)
and shares version 2's launch contract: the plan kernel of ``prefill_attention.cu`` lists the work items
heaviest first into a scratch array sized from shapes only (``capacity * num_kv_heads`` work indices), then
thread blocks of 384 threads walk it: one per index (version 4; those past the real items exit) or
``min(capacity * num_kv_heads, number of SMs)`` persistent ones (version 5), so a launch is captured in a CUDA
graph and replayed with new lengths.
"""
from __future__ import annotations

import math
from functools import lru_cache

from .compile import load_sm90a, num_sms

FILENAME = "prefill_attention_sm90.cu"
VERSIONS = (4, 5)
DEFAULT_VERSION = {64: 5, 128: 4}  # measured: kernels_cu/NOTES_prefill.md (H100, 2026-12-07)
HEAD_DIMS = (64, 128)
THREADS, BLOCK_M, BLOCK_N = 384, 128, 128
STAGES = {64: 4, 128: 2}  # K/V ring depth: what fits next to the Q tile in 227 KB of shared memory
PLAN_THREADS = 1024  # prefill_attention.cu: PAGEDKV_PLAN_THREADS


def stages_of(head_dim: int, defines: tuple = ()) -> int:
    """The K/V ring depth: ``PAGEDKV_SM90_STAGES`` from ``defines`` (benchmark variants), else :data:`STAGES`."""
    return int(dict(defines).get("PAGEDKV_SM90_STAGES", STAGES[head_dim]))


def kernel_name(version: int, dt: int, head_dim: int, stages: int | None = None) -> str:
    return f"prefill_attention_v{version}_kernel<{dt}, {head_dim}, {stages or STAGES[head_dim]}>"


def names() -> tuple[str, ...]:
    """Every instantiation the launcher launches by default (the compile test's list)."""
    return tuple(kernel_name(v, dt, hd) for v in VERSIONS for dt in (1, 2) for hd in HEAD_DIMS)


def smem_bytes(version: int, head_dim: int, stages: int | None = None) -> int:
    """Mirror of ``PAGEDKV_SM90_V{4,5}_SMEM_BYTES``: alignment slack, Q tile, K and V rings, mbarriers (version
    5 has one more: q_empty)."""
    stages = stages or STAGES[head_dim]
    return 1024 + (BLOCK_M + 2 * stages * BLOCK_N) * head_dim * 2 + 8 * ((version == 5) + 1 + 4 * stages)


@lru_cache(maxsize=None)
def available(device_id: int) -> bool:
    """Versions 4 and 5 need compute capability 9.0 (H100 / H200): wgmma and setmaxnreg are sm_90a
    instructions."""
    import cupy

    return cupy.cuda.Device(device_id).compute_capability == "90"


def supports(dt: int, head_dim: int, device_id: int) -> bool:
    """Whether versions 4 and 5 run (dt, head_dim) on this device: float16 / bfloat16 (codes 1, 2), head_dim 64
    / 128."""
    return dt in (1, 2) and head_dim in HEAD_DIMS and available(device_id)


@lru_cache(maxsize=None)
def _kernel(version: int, dt: int, head_dim: int, device_id: int, defines: tuple = ()):
    """The kernel compiled for sm_90a (:func:`pagedkv.kernels.compile.load_sm90a`): ``(module, function)``."""
    import cupy

    stages = stages_of(head_dim, defines)
    module, function = load_sm90a(FILENAME, kernel_name(version, dt, head_dim, stages), tuple(defines))
    cupy.cuda.driver.funcSetAttribute(function.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                      smem_bytes(version, head_dim, stages))
    return module, function


def prepare(version: int, out, q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale: float,
            dt: int, plan_kernel, capacity, defines: tuple = ()):
    """Version 4's or 5's launch (plan kernel, then the warp-specialized grid) as a closure; scratch allocated
    now.
    ``defines``: ``-D`` options of the .cu file (``PAGEDKV_SM90_STAGES`` also picks the template argument).

    ``plan_kernel``: prefill_attention.cu's ``prefill_plan_kernel``; ``capacity(num_tokens, num_seqs, group,
    block_m)``: the work-list bound of version 2 (both passed in by the dispatcher, which owns them).
    """
    import cupy

    num_tokens, num_qo_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    num_seqs, max_blocks = block_tables.shape
    group = num_qo_heads // num_kv_heads
    cap = capacity(num_tokens, num_seqs, group, BLOCK_M)
    if cap == 0 or num_tokens == 0:
        return lambda: None
    _, kernel = _kernel(version, dt, head_dim, cupy.cuda.Device().id, tuple(defines))
    work_list = cupy.empty(2 * cap, dtype=cupy.int32)
    max_work = max(1, -(-max_blocks * block_size // BLOCK_N))
    plan_args = (work_list, query_start_loc, context_lens, cupy.int32(num_seqs), cupy.int32(group),
                 cupy.int32(BLOCK_M), cupy.int32(BLOCK_N), cupy.int32(max_work), cupy.int32(cap))
    num_work = cap * num_kv_heads
    persistent = version == 5 and int(dict(defines).get("PAGEDKV_SM90_PERSISTENT", 1))
    grid = min(num_work, num_sms(cupy.cuda.Device().id)) if persistent else num_work
    work_args = (work_list, cupy.int32(num_work)) if version == 5 else (work_list,)
    args = (out, q, k_cache, v_cache, block_tables, query_start_loc, context_lens, *work_args,
            cupy.int32(num_qo_heads), cupy.int32(num_kv_heads), cupy.int32(group),
            cupy.int32(block_size.bit_length() - 1), cupy.int32(max_blocks), cupy.float32(scale * math.log2(math.e)))
    smem = smem_bytes(version, head_dim, stages_of(head_dim, defines))

    def launch():
        plan_kernel((1,), (PLAN_THREADS,), plan_args)
        kernel((grid,), (THREADS,), args, shared_mem=smem)
    return launch
