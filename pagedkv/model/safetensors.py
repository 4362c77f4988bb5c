"""A torch-free safetensors reader and writer (NumPy; bfloat16 and float8 through ``ml_dtypes``).

File layout::

    [8 bytes: little-endian u64 N][N bytes: JSON header][raw tensor bytes: the data section]
    header = {"name": {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {..}}

Offsets are relative to the first byte of the data section; tensors are C-order, little-endian.

The file is untrusted. Before any tensor is mapped, every header field is checked as the reference reader
(Hugging Face's Rust ``safetensors``) checks it, and any violation raises :class:`SafetensorsError` naming
the file and the field:

- only a regular file is opened (a FIFO or a device named ``*.safetensors`` is refused, never read);
- ``8 + N <= file size`` and ``2 <= N <= MAX_HEADER_BYTES``; the header is UTF-8 JSON holding one object,
  without duplicate keys or NaN/Infinity constants;
- each tensor: ``dtype`` a known code; ``shape`` a list of at most ``MAX_DIMS`` ints >= 0;
  ``data_offsets`` two ints ``0 <= begin <= end``; ``end - begin == prod(shape) * itemsize``;
- the tensors, sorted by offset, tile the data section exactly: the first begins at 0, each begins where
  the previous ends (no overlap, hence no aliasing, and no gap) and the last ends at the end of the file;
- ``__metadata__`` is absent, null or an object of string values.
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
CODES = {dt: code for code, dt in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the reference reader's limit
MAX_DIMS = 32  # NumPy 1.x's limit on array dimensions
METADATA_KEY = "__metadata__"


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file; the message names the file and the offending field."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One validated header entry: ``[begin, end)`` are byte offsets into the data section."""

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True, slots=True)
class Header:
    """A validated header: tensors by name, ``__metadata__`` and where the data section starts in the file."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], int]:
    """Return ``(tensors, data_start)``: the validated entries (``__metadata__`` aside) and the data's offset."""
    with _open(path) as (f, size):
        header = _read_header(f, size, path)
    return header.tensors, header.data_start


def read_metadata(path: str | Path) -> dict[str, str]:
    """The file's ``__metadata__`` (``{}`` if absent), after validating the whole header."""
    with _open(path) as (f, size):
        return _read_header(f, size, path).metadata


def load_file(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of one ``.safetensors`` file as read-only arrays over a memory map (no copy is made)."""
    with _open(path) as (f, size):
        header = _read_header(f, size, path)
        if not header.tensors:
            return {}
        data = np.memmap(f, dtype=np.uint8, mode="r", shape=(size,)).view(np.ndarray)  # the map stays its base
    start = header.data_start
    return {name: data[start + t.begin:start + t.end].view(t.dtype).reshape(t.shape)
            for name, t in header.tensors.items()}


def save_file(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict | None = None) -> None:
    """Write NumPy arrays as a ``.safetensors`` file (8-byte aligned header, tensors in name order)."""
    if METADATA_KEY in tensors:  # NOTE: the header's reserved key: the reader would refuse the file
        raise ValueError(f"tensor name {METADATA_KEY!r} is reserved for the header's metadata")
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        a = np.asarray(tensors[name])  # NOTE: not ascontiguousarray, which turns a 0-d array into [1]
        if a.dtype not in CODES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {a.dtype}")
        blob = a.tobytes()
        header[name] = {"dtype": CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header[METADATA_KEY] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


# -- opening: regular files only ------------------------------------------------------------------------------
class _open:
    """``with _open(path) as (f, size)``: a regular file opened for reading, never blocking on a FIFO."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                raise SafetensorsError(f"{self.path}: not a regular file")
            # NOTE: O_NONBLOCK, and the check again on the open descriptor: a FIFO swapped in after the stat
            # must not block the open (regular files ignore the flag)
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise SafetensorsError(f"{self.path}: cannot open ({exc.strerror})") from None
        self.f = os.fdopen(fd, "rb")
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            self.f.close()
            raise SafetensorsError(f"{self.path}: not a regular file")
        return self.f, info.st_size

    def __exit__(self, *exc):
        self.f.close()


# -- the header --------------------------------------------------------------------------------------------------
def _read_header(f, size: int, path) -> Header:
    raw = f.read(8)
    if len(raw) != 8:
        raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if not 2 <= n <= MAX_HEADER_BYTES:
        raise SafetensorsError(f"{path}: header length {n} is outside [2, {MAX_HEADER_BYTES}]")
    if 8 + n > size:
        raise SafetensorsError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
    text = f.read(n)
    if len(text) != n:
        raise SafetensorsError(f"{path}: file shrank while reading the header")
    obj = _parse_json(text, path)
    metadata = _metadata(obj.pop(METADATA_KEY, None), path)
    data_size = size - 8 - n
    tensors = {name: _tensor_info(name, info, data_size, path) for name, info in obj.items()}
    _check_tiling(tensors, data_size, path)
    return Header(tensors, metadata, 8 + n)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise _DuplicateKey(f"duplicate key {dup!r}")
    return dict(pairs)


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _parse_json(text: bytes, path) -> dict:
    try:
        obj = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise SafetensorsError(f"{path}: header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise SafetensorsError(f"{path}: header is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # json.JSONDecodeError, duplicate keys, NaN/Infinity
        raise SafetensorsError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object, got {type(obj).__name__}")
    return obj


def _metadata(meta, path) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SafetensorsError(f"{path}: {METADATA_KEY} must be an object of strings, got {_short(meta)}")
    return meta


def _is_int(x) -> bool:
    return type(x) is int  # NOTE: not bool, which JSON true/false would give


def _tensor_info(name: str, info, data_size: int, path) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise SafetensorsError(f"{where}: entry must be an object, got {_short(info)}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise SafetensorsError(f"{where}: missing field {missing[0]!r}")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise SafetensorsError(f"{where}: dtype must be one of {sorted(DTYPES)}, got {_short(code)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise SafetensorsError(f"{where}: shape must be a list of at most {MAX_DIMS} ints >= 0, got {_short(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise SafetensorsError(f"{where}: data_offsets must be two ints, got {_short(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise SafetensorsError(f"{where}: data_offsets [{begin}, {end}] must satisfy 0 <= begin <= end <= "
                               f"{data_size} (the data section's size)")
    dtype = DTYPES[code]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise SafetensorsError(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes but shape "
                               f"{shape} of {code} needs {math.prod(shape) * dtype.itemsize}")
    return TensorInfo(dtype, tuple(shape), begin, end)


def _check_tiling(tensors: dict[str, TensorInfo], data_size: int, path) -> None:
    """Sorted by offset, the tensors must cover ``[0, data_size)`` exactly once."""
    pos, prev = 0, None
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != pos:
            what = f"overlaps tensor {prev!r}" if t.begin < pos else f"leaves a gap of {t.begin - pos} bytes"
            raise SafetensorsError(f"{path}: tensor {name!r}: data_offsets [{t.begin}, {t.end}] {what} "
                                   f"(tensors must tile the data section, the previous one ends at {pos})")
        pos, prev = t.end, name
    if pos != data_size:
        raise SafetensorsError(f"{path}: data section is {data_size} bytes but its tensors cover {pos} "
                               f"(trailing bytes belong to no tensor)")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
