"""The safetensors reader trusts nothing in the file (issue 8, finding 3).

Each case below is a file a hostile user can write; the reader must refuse it with ``SafetensorsError``
(a ``ValueError``) naming the file and the field, before any tensor is mapped, and never hang, recurse or
raise anything else. A Hypothesis fuzz mutates valid files (byte flips, truncation, JSON edits).
"""
import json
import os
import struct
import threading

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedkv.model.safetensors import SafetensorsError, load_file, read_header, read_metadata, save_file


def write_raw(path, header, data=b"", *, length=None):
    """A file with ``header`` (a dict, or raw bytes) as its JSON header and ``data`` as its data section."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def refused(path, *fragments):
    """``load_file`` raises SafetensorsError whose message names the file and every fragment."""
    with pytest.raises(SafetensorsError) as info:
        load_file(path)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_error_type_is_a_value_error():
    assert issubclass(SafetensorsError, ValueError)


# -- offsets ---------------------------------------------------------------------------------------------------
def test_negative_begin_cannot_read_the_header_as_a_tensor(tmp_path):
    # the old reader sliced data[start - 8:start] and returned 8 bytes of the JSON header as a tensor
    header = {"a": entry("U8", (8,), (-8, 0)), "b": entry("U8", (8,), (0, 8))}
    refused(write_raw(tmp_path / "neg.safetensors", header, bytes(8)), "'a'", "data_offsets")


def test_reversed_offsets_are_refused(tmp_path):
    header = {"a": entry("U8", (0,), (8, 8)), "b": entry("U8", (8,), (8, 0))}
    refused(write_raw(tmp_path / "rev.safetensors", header, bytes(8)), "data_offsets")


def test_offsets_past_the_data_section_are_refused(tmp_path):
    refused(write_raw(tmp_path / "past.safetensors", {"a": entry("F32", (4,), (0, 16))}, bytes(8)), "data_offsets")


def test_overlapping_tensors_do_not_alias(tmp_path):
    header = {"a": entry("F32", (2,), (0, 8)), "b": entry("F32", (2,), (4, 12))}
    refused(write_raw(tmp_path / "overlap.safetensors", header, bytes(12)), "overlaps")
    same = {"a": entry("F32", (2,), (0, 8)), "b": entry("F32", (2,), (0, 8))}
    refused(write_raw(tmp_path / "same.safetensors", same, bytes(8)), "overlaps")


def test_gaps_and_trailing_bytes_are_refused(tmp_path):
    header = {"a": entry("F32", (1,), (0, 4)), "b": entry("F32", (1,), (8, 12))}
    refused(write_raw(tmp_path / "gap.safetensors", header, bytes(12)), "gap")
    refused(write_raw(tmp_path / "tail.safetensors", {"a": entry("F32", (1,), (0, 4))}, bytes(9)), "trailing")


@pytest.mark.parametrize("offsets", [[0], [0, 8, 16], [0.0, 8.0], ["0", "8"], [False, True], None, {"0": 8}])
def test_offsets_must_be_two_ints(tmp_path, offsets):
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": offsets}}
    refused(write_raw(tmp_path / "off.safetensors", header, bytes(1)), "'a'", "data_offsets")


# -- shapes and dtypes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [[-1], [-1, 0], [0, -3], [2, -2], [2.0], ["2"], [True], 4, None, [[2]], [1] * 33])
def test_shape_must_be_a_list_of_non_negative_ints(tmp_path, shape):
    header = {"a": {"dtype": "U8", "shape": shape, "data_offsets": [0, 4]}}
    refused(write_raw(tmp_path / "shape.safetensors", header, bytes(4)), "'a'", "shape")


def test_negative_shape_no_longer_gives_an_empty_tensor(tmp_path):
    # prod([-1, 0]) * 4 == 0 bytes matched the offsets, and reshape read -1 as "infer": an empty tensor
    header = {"a": entry("F32", (-1, 0), (0, 0)), "b": entry("F32", (1,), (0, 4))}
    refused(write_raw(tmp_path / "neg_shape.safetensors", header, bytes(4)), "'a'", "shape")


def test_shape_and_byte_length_must_agree(tmp_path):
    refused(write_raw(tmp_path / "len.safetensors", {"a": entry("F32", (3,), (0, 8))}, bytes(8)), "needs 12")


@pytest.mark.parametrize("dtype", ["F31", "f32", "", 7, None, ["F32"]])
def test_unknown_dtype_is_refused(tmp_path, dtype):
    header = {"a": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}
    refused(write_raw(tmp_path / "dtype.safetensors", header, bytes(4)), "'a'", "dtype")


# -- structure -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("header, field", [
    (b"[1, 2]", "JSON object"), (b"7 ", "JSON object"), (b"null", "JSON object"), (b'"a"', "JSON object"),
    (b"{ ", "not valid JSON"), (b"\xff\xfe{}", "UTF-8"), (b'{"a": NaN}', "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON"),  # the old reader raised RecursionError
    (b'{"a": 1}', "entry must be an object"), (b'{"a": []}', "entry must be an object"),
    (b'{"a": {"shape": [1], "data_offsets": [0, 4]}}', "missing field 'dtype'"),
    (b'{"a": {"dtype": "F32", "data_offsets": [0, 4]}}', "missing field 'shape'"),
    (b'{"a": {"dtype": "F32", "shape": [1]}}', "missing field 'data_offsets'"),
    (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
     b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', "duplicate key"),
])
def test_malformed_headers_raise_one_error_type(tmp_path, header, field):
    refused(write_raw(tmp_path / "bad.safetensors", header, bytes(4)), field)


@pytest.mark.parametrize("meta", [[1], "x", {"k": 1}, {"k": None}, {"k": {"a": "b"}}])
def test_metadata_must_map_strings_to_strings(tmp_path, meta):
    header = {"__metadata__": meta, "a": entry("U8", (1,), (0, 1))}
    refused(write_raw(tmp_path / "meta.safetensors", header, bytes(1)), "__metadata__")


def test_header_length_is_bounded_by_the_file(tmp_path):
    refused(write_raw(tmp_path / "long.safetensors", b"{}", length=10**6), "past the end")
    refused(write_raw(tmp_path / "huge.safetensors", b"{}", length=2**63), "header length")
    refused(write_raw(tmp_path / "zero.safetensors", b"", length=0), "header length")
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    refused(tmp_path / "short.safetensors", "shorter than 8 bytes")


# -- what is opened --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    outcome = []

    def load():
        try:
            load_file(fifo)
        except Exception as exc:  # noqa: BLE001 - the type is what the test checks
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # unblock the reader (the old code blocks in open()) before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail("load_file blocked on a FIFO")
    assert isinstance(outcome[0], SafetensorsError) and "not a regular file" in str(outcome[0])


def test_a_directory_or_a_missing_file_is_refused(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    refused(tmp_path / "dir.safetensors", "not a regular file")
    refused(tmp_path / "missing.safetensors", "cannot open")


# -- valid files still load -------------------------------------------------------------------------------------------
def test_valid_files_round_trip_with_metadata_and_empty_tensors(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "e": np.zeros((0, 3), np.float16),
               "b": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16), "u": np.arange(3, dtype=np.uint32),
               "f8": np.array([0.5, 2.0], dtype=ml_dtypes.float8_e4m3fn), "s": np.float64(3.0)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == np.asarray(v).dtype and back[k].shape == np.shape(v)
        np.testing.assert_array_equal(back[k], v)
    assert read_metadata(tmp_path / "x.safetensors") == {"format": "pt"}
    infos, start = read_header(tmp_path / "x.safetensors")
    assert infos["a"].shape == (2, 3) and infos["a"].end - infos["a"].begin == 24 and start % 8 == 0
    save_file({}, tmp_path / "empty.safetensors")
    assert load_file(tmp_path / "empty.safetensors") == {}


# -- fuzz: mutated headers give a correct load or SafetensorsError, nothing else ------------------------------------
BASE = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(4, dtype=np.float16),
        "z": np.zeros((2, 0), dtype=np.int64), "i": np.arange(3, dtype=np.int8)}
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=6), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6)


def _base_bytes() -> bytes:
    header, offset, blobs = {}, 0, []
    for name, a in BASE.items():
        blob = a.tobytes()
        header[name] = {"dtype": {"float32": "F32", "float16": "F16", "int64": "I64", "int8": "I8"}[a.dtype.name],
                        "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    return json.dumps(header).encode(), b"".join(blobs)


def _json_edit(draw):
    header, blob = _base_bytes()
    obj = json.loads(header)
    name = draw(st.sampled_from(sorted(obj)))
    target = obj[name]
    if isinstance(target, dict) and target and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(target)))
        target[key] = draw(JSON_VALUES)
    elif draw(st.booleans()):
        obj[name] = draw(JSON_VALUES)
    else:
        del obj[name]
    return struct.pack("<Q", len(json.dumps(obj).encode())) + json.dumps(obj).encode() + blob


@st.composite
def mutated_files(draw):
    header, blob = _base_bytes()
    raw = bytearray(struct.pack("<Q", len(header)) + header + blob)
    kind = draw(st.sampled_from(["flip", "truncate", "json", "length"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, 8 + len(header) - 1))
            raw[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif kind == "json":
        raw = bytearray(_json_edit(draw))
    else:
        raw[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(raw)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(raw=mutated_files())
def test_fuzz_mutated_files_raise_only_the_documented_error(tmp_path, raw):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(raw)
    try:
        tensors = load_file(path)
    except SafetensorsError as exc:
        assert str(path) in str(exc)
        return
    # a mutation that still parses must give tensors that exactly tile the data section, within the file
    infos, start = read_header(path)
    assert sum(t.end - t.begin for t in infos.values()) == len(raw) - start
    for name, a in tensors.items():
        assert a.nbytes == infos[name].end - infos[name].begin
        assert a.shape == infos[name].shape and min(a.shape, default=0) >= 0
