"""BlockHasher: a known answer computed by hand, the chain's prefix property (Hypothesis), extension from a
parent, ``extra`` separating models, the same digests in every process, bad input refused."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedkv.cache.block_hash import BlockHasher, main

HASHER = BlockHasher.for_model("tiny", "float32", 4)


def test_known_answer():
    """Digests equal the documented construction, rebuilt here from hashlib alone."""
    extra = b"m"
    root = hashlib.sha256(b"pagedkv-block-hash-v1" + (1).to_bytes(8, "little") + b"m").digest()
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    h0 = hashlib.sha256(root + np.array([1, 2, 3, 4], "<i8").tobytes()).digest()
    h1 = hashlib.sha256(h0 + np.array([5, 6, 7, 8], "<i8").tobytes()).digest()
    hasher = BlockHasher(extra)
    assert hasher.root == root
    assert hasher.hash_full_blocks(tokens, 4) == [h0, h1]  # token 9 is a partial block: no hash
    assert all(len(h) == 32 for h in (h0, h1))


def test_for_model_tags_each_field():
    """Fields are tagged JSON, so moving text from one field to another changes the hash (no domain mixing)."""
    a = BlockHasher.for_model("a", "bfloat16", 16)
    assert json.loads(a.extra) == {"model": "a", "dtype": "bfloat16", "block_size": 16}
    others = [BlockHasher.for_model("ab", "float16", 16), BlockHasher.for_model("a", "float16", 32),
              BlockHasher.for_model("b", "bfloat16", 16), BlockHasher(b"")]
    tokens = list(range(16))
    hashes = {h.hash_full_blocks(tokens, 16)[0] for h in [a, *others]}
    assert len(hashes) == 5
    assert BlockHasher.for_model("a", "bfloat16", 16) == a  # a value: equal fields, equal hasher


@given(common=st.lists(st.integers(0, 3), max_size=20), a=st.lists(st.integers(0, 3), max_size=12),
       b=st.lists(st.integers(0, 3), max_size=12), block_size=st.sampled_from([1, 2, 4]))
def test_equal_hashes_exactly_on_the_shared_prefix(common, a, b, block_size):
    """Block i's hashes agree iff the two sequences agree on every token up to the end of block i."""
    x, y = common + a, common + b
    hx, hy = HASHER.hash_full_blocks(x, block_size), HASHER.hash_full_blocks(y, block_size)
    assert len(hx) == len(x) // block_size and len(hy) == len(y) // block_size
    for i in range(min(len(hx), len(hy))):
        end = (i + 1) * block_size
        assert (hx[i] == hy[i]) == (x[:end] == y[:end])
    assert len(set(hx)) == len(hx)  # one chain never repeats a hash


@given(tokens=st.lists(st.integers(0, 2**40), max_size=40), split=st.integers(0, 10),
       block_size=st.sampled_from([1, 3, 4]))
def test_extending_a_chain_from_its_parent(tokens, split, block_size):
    """Hashing more blocks later (decode, chunked prefill) continues the same chain."""
    whole = HASHER.hash_full_blocks(tokens, block_size)
    k = min(split, len(whole))
    head = HASHER.hash_full_blocks(tokens[: k * block_size], block_size)
    tail = HASHER.hash_full_blocks(tokens[k * block_size:], block_size, parent=head[-1] if head else None)
    assert head + tail == whole


def test_numpy_and_list_inputs_agree():
    tokens = list(range(100, 133))
    expected = HASHER.hash_full_blocks(tokens, 4)
    for dtype in (np.int32, np.int64, np.uint32, np.uint16):
        assert HASHER.hash_full_blocks(np.array(tokens, dtype=dtype), 4) == expected
    assert HASHER.hash_full_blocks(tuple(tokens), 4) == expected
    assert HASHER.hash_full_blocks([], 4) == [] and HASHER.hash_full_blocks([1, 2, 3], 4) == []


def test_same_digests_in_every_process():
    """Unlike ``hash()``, salted per process, two interpreters with different hash seeds agree."""
    code = ("from pagedkv.cache.block_hash import BlockHasher\n"
            "print(BlockHasher.for_model('m', 'float16', 2).hash_full_blocks([5, 6, 7, 8], 2)[1].hex())")
    outs = set()
    for seed in ("1", "2"):
        env = {"PYTHONHASHSEED": seed, "PYTHONPATH": ":".join(sys.path)}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout.strip())
    assert outs == {BlockHasher.for_model("m", "float16", 2).hash_full_blocks([5, 6, 7, 8], 2)[1].hex()}


@pytest.mark.parametrize("call, bad", [
    (lambda: BlockHasher("text"), "str"),
    (lambda: BlockHasher.for_model("m", "f16", 0), "0"),
    (lambda: BlockHasher.for_model("m", "f16", True), "True"),
    (lambda: HASHER.hash_full_blocks([1, 2], 0), "0"),
    (lambda: HASHER.hash_full_blocks([1, 2], 2.0), "2.0"),
    (lambda: HASHER.hash_full_blocks([1, 2], 2, parent=b"short"), "short"),
    (lambda: HASHER.hash_full_blocks([1, 2], 2, parent="x" * 32), "x"),
    (lambda: HASHER.hash_full_blocks("abcd", 2), "str"),
    (lambda: HASHER.hash_full_blocks([1.5, 2], 2), "float"),
    (lambda: HASHER.hash_full_blocks([2**63, 2], 2), "int64"),
    (lambda: HASHER.hash_full_blocks(np.array([1.0, 2.0]), 2), "float64"),
    (lambda: HASHER.hash_full_blocks(np.zeros((2, 2), np.int64), 2), "(2, 2)"),
])
def test_bad_input_is_refused(call, bad):
    with pytest.raises(ValueError) as info:
        call()
    assert bad in str(info.value)


def test_measurement_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "hash.json"
    main(["--num-tokens", "64", "--block-size", "16", "--output-json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    names = [r["hash"] for r in rows]
    assert "hashlib.sha256" in names and "BlockHasher.hash_full_blocks (this module)" in names
    assert all(r["us_per_prompt"] > 0 for r in rows)
    assert "sha256" in capsys.readouterr().out
