"""The manager as the only door to block ids: copies from a cached block, static reservations, naming one
block, finding a cached block, and the block counts the scheduler plans with (each checked against what the
call then takes; refused calls change nothing)."""
import numpy as np
import pytest

from pagedkv import OutOfBlocksError
from test_manager import HASHER, assert_refused, assert_same_state, kv, make, make_caching, state


def named_sequence(m, rng, num_tokens=8):
    """A sequence of ``num_tokens`` with fresh K/V whose full blocks are named; returns (seq, hashes, k, v)."""
    k, v = kv(rng, m, num_tokens)
    seq = m.add_sequence(num_tokens, k=k, v=v)
    hashes = HASHER.hash_full_blocks(list(range(num_tokens)), m.block_size)
    assert m.register_blocks(seq, hashes) == len(hashes)
    return seq, hashes, k, v


def test_add_sequence_copy_from_copies_the_cached_block_and_lets_it_go():
    m, rng = make_caching(), np.random.default_rng(0)
    a, hashes, k, v = named_sequence(m, rng)
    src = m.cached_block(hashes[1])
    assert src == m.block_table(a)[1]
    m.free_sequence(a)                                     # both blocks evictable now
    assert m.num_blocks_to_add(7, cached_block_ids=[0], copy_from=src) == 3  # fresh, evictable cached, held source
    b = m.add_sequence(7, cached_block_ids=[m.cached_block(hashes[0])], copy_from=src)
    table = m.block_table(b)
    assert len(table) == 2 and table[1] != src
    for layer in range(m.kv_cache.num_layers):
        np.testing.assert_array_equal(m.kv_cache.k_pool[layer, table[1]], m.kv_cache.k_pool[layer, src])
        np.testing.assert_array_equal(m.kv_cache.v_pool[layer, table[1]], m.kv_cache.v_pool[layer, src])
    assert m.block_manager.ref_count(src) == 0 and m.cached_block(hashes[1]) == src  # released, still cached
    m.block_manager.check_invariants()


@pytest.mark.parametrize("bad", [99, -1, True, "1"])
def test_copy_from_a_block_that_is_not_cached_is_refused(bad):
    m, rng = make_caching(), np.random.default_rng(1)
    named_sequence(m, rng)
    assert_refused(m, ValueError, m.add_sequence, 6, copy_from=bad, value=bad)


def test_copy_from_without_a_block_to_copy_into_is_refused():
    m, rng = make_caching(), np.random.default_rng(2)
    _, hashes, _, _ = named_sequence(m, rng)
    cached = [m.cached_block(hashes[0])]
    assert_refused(m, ValueError, m.add_sequence, 4, cached_block_ids=cached, copy_from=m.cached_block(hashes[1]),
                   value=m.cached_block(hashes[1]))


def test_copy_from_out_of_blocks_changes_nothing():
    m, rng = make_caching(num_blocks=3), np.random.default_rng(3)
    a, hashes, _, _ = named_sequence(m, rng)
    src = m.cached_block(hashes[1])
    before = state(m)
    with pytest.raises(OutOfBlocksError):
        m.add_sequence(12, copy_from=src)                 # 3 fresh blocks, 1 free
    assert_same_state(m, before)
    assert m.block_table(a)[1] == src


def test_reservations_hold_raw_blocks_and_give_them_back():
    m = make(num_blocks=8)
    m.reserve("r1", 3)
    m.reserve("r2", 2)
    assert (m.num_reserved("r1"), m.num_reserved("r2"), m.num_free_blocks) == (3, 2, 3)
    assert m.release_reserved("r1", 2) == 2 and m.num_reserved("r1") == 1 and m.num_free_blocks == 5
    assert m.release_reserved("r1", 5) == 1 and m.num_reserved("r1") == 0
    assert m.release_reserved("r2") == 2 and m.release_reserved("never") == 0
    assert m.num_free_blocks == 8 and m.usage().num_used_blocks == 0
    m.block_manager.check_invariants()


def test_a_reservation_that_does_not_fit_changes_nothing():
    m = make(num_blocks=4)
    m.reserve("r1", 3)
    before = state(m)
    with pytest.raises(OutOfBlocksError):
        m.reserve("r2", 2)
    assert_same_state(m, before)
    assert m.num_reserved("r2") == 0


def test_register_block_names_one_full_block():
    m, rng = make_caching(), np.random.default_rng(4)
    k, v = kv(rng, m, 6)
    seq = m.add_sequence(6, k=k, v=v)
    hashes = HASHER.hash_full_blocks(list(range(8)), 4)
    assert m.cached_block(hashes[0]) is None
    assert m.register_block(seq, 0, hashes[0]) is True
    assert m.cached_block(hashes[0]) == m.block_table(seq)[0]
    other = m.add_sequence(4, k=k[:, :4], v=v[:, :4])
    assert m.register_block(other, 0, hashes[0]) is False   # the same content is named in another block
    assert_refused(m, ValueError, m.register_block, seq, 1, hashes[1], value=1)   # block 1 is partial


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 6])
def test_num_blocks_to_append_is_what_append_slots_takes(num_tokens):
    m, rng = make(num_blocks=16), np.random.default_rng(5)
    k, v = kv(rng, m, 6)
    parent = m.add_sequence(6, k=k, v=v)
    child = m.fork_sequence(parent)                       # shared partial block: the first append copies it
    for seq in (child, parent):
        need, free = m.num_blocks_to_append(seq, num_tokens), m.num_free_blocks
        m.append_slots(seq, num_tokens)
        assert free - m.num_free_blocks == need
