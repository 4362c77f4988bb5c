"""A torch-free safetensors reader and writer (NumPy; bfloat16 through ``ml_dtypes``).

File layout::

    [8 bytes: little-endian u64 N][N bytes: JSON header][raw tensor bytes]
    header = {"name": {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {..}}

Offsets are relative to the first byte after the header; tensors are C-order, little-endian.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
CODES = {dt: code for code, dt in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000


def read_header(path: str | Path) -> tuple[dict, int]:
    """Return ``(header, data_start)``: the JSON header (without ``__metadata__``) and the data's byte offset."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header length {n} is implausible")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: bad safetensors header ({exc})") from exc
    header.pop("__metadata__", None)
    return header, 8 + n


def load_file(path: str | Path) -> dict[str, np.ndarray]:
    """Read every tensor of one ``.safetensors`` file (memory-mapped, read-only)."""
    header, start = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dt = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dt.itemsize or start + end > data.size:
            raise ValueError(f"{path}: tensor {name!r} offsets {begin}..{end} do not match shape {shape} {dt}")
        tensors[name] = data[start + begin:start + end].view(dt).reshape(shape)
    return tensors


def save_file(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict | None = None) -> None:
    """Write NumPy arrays as a ``.safetensors`` file (8-byte aligned header, tensors in name order)."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in CODES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {a.dtype}")
        blob = a.tobytes()
        header[name] = {"dtype": CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
