"""The collectives of a tensor-parallel rank on GPUs: NCCL through CuPy's binding (``cupy.cuda.nccl``).

One communicator per rank (one process per GPU); rank 0 makes the unique id and the driver hands it to every
rank. Each call is enqueued on the current stream, so it is captured into a CUDA graph with the forward around
it (NCCL supports capture since 2.9). NOTE: no collective of our own: NCCL picks NVLink / PCIe rings and trees.
"""
from __future__ import annotations

import numpy as np

from ..backend import dtype_of
from .tensor_parallel import Collective


def nccl_status() -> tuple[bool, str]:
    """(usable, why not): CuPy's NCCL binding loads and found a libnccl."""
    try:
        from cupy.cuda import nccl
    except Exception as exc:  # noqa: BLE001 - an import that fails in any way means "not usable"
        return False, f"cupy.cuda.nccl does not import ({type(exc).__name__}: {exc})"
    if not getattr(nccl, "available", False):
        return False, "CuPy was built without NCCL or found no libnccl (install nvidia-nccl-cu12 / -cu13)"
    return True, ""


def unique_id() -> tuple:
    """A new NCCL unique id (rank 0 makes it; every rank of the world gets the same one)."""
    from cupy.cuda import nccl

    return nccl.get_unique_id()


class NcclCollective(Collective):
    """``all_reduce`` (sum) and ``all_gather`` (concatenated on the last axis) over an NCCL communicator.

    Args:
        rank, size: this rank and the world size; unique_id: from :func:`unique_id` on rank 0.
    The communicator is made on the current device; arrays must live there.
    """

    def __init__(self, rank: int, size: int, unique_id):
        usable, why = nccl_status()
        if not usable:
            raise RuntimeError(f"tensor parallelism on GPUs needs NCCL: {why}")
        import cupy
        from cupy.cuda import nccl

        self.cupy, self.nccl, self.rank, self.size = cupy, nccl, rank, size
        self.comm = nccl.NcclCommunicator(size, unique_id, rank)
        self._types = {np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.float32): nccl.NCCL_FLOAT32,
                       dtype_of("bfloat16"): nccl.NCCL_BFLOAT16}

    def _type(self, x):
        try:
            return self._types[np.dtype(x.dtype)]
        except KeyError:
            raise ValueError(f"NCCL collectives take float16, bfloat16 or float32 arrays, got {x.dtype}") from None

    def all_reduce(self, x):
        x = self.cupy.ascontiguousarray(x)
        out = self.cupy.empty_like(x)
        stream = self.cupy.cuda.get_current_stream().ptr
        self.comm.allReduce(x.data.ptr, out.data.ptr, x.size, self._type(x), self.nccl.NCCL_SUM, stream)
        return out

    def all_gather(self, x):
        x = self.cupy.ascontiguousarray(x)
        out = self.cupy.empty((self.size,) + x.shape, dtype=x.dtype)
        stream = self.cupy.cuda.get_current_stream().ptr
        self.comm.allGather(x.data.ptr, out.data.ptr, x.size, self._type(x), stream)
        # [N, ..., P] -> [..., N * P]: rank r's columns at [r * P, (r + 1) * P)
        return self.cupy.moveaxis(out, 0, -2).reshape(x.shape[:-1] + (self.size * x.shape[-1],))

    def close(self) -> None:
        self.comm.destroy()


__all__ = ["NcclCollective", "nccl_status", "unique_id"]
