"""PagedAttentionManager: the API step by step, copy-on-write, usage figures, batch outputs, bad input that
changes nothing, and a Hypothesis state machine proving every sequence reads back exactly what it wrote."""
import hashlib
import re

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagedkv import KVCache, OutOfBlocksError, PagedAttentionManager
from pagedkv.cache.block_hash import BlockHasher
from pagedkv.kernels.reference import dense_attention

L, H, D = 2, 2, 4  # layers, kv heads, head dim of the small managers below


def make(num_blocks=8, block_size=4, num_layers=L, num_kv_heads=H, head_dim=D, dtype="float32"):
    """A CPU manager whose pools are NaN everywhere: a read of a slot nobody wrote shows."""
    m = PagedAttentionManager.create(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, "cpu")
    m.kv_cache.k_pool[...] = np.nan
    m.kv_cache.v_pool[...] = np.nan
    return m


def kv(rng, m, *tokens):
    """Fresh random K and V of shape [num_layers, *tokens, num_kv_heads, head_dim] in the cache dtype."""
    c = m.kv_cache
    shape = (c.num_layers, *tokens, c.num_kv_heads, c.head_dim)
    return tuple(rng.standard_normal(shape).astype(c.dtype) for _ in range(2))


def gathered(m, seq_id):
    """Per layer, the sequence's (K, V) read back through its block table."""
    table, n = m.block_table(seq_id), m.context_len(seq_id)
    return [m.kv_cache.gather(layer, table, n) for layer in range(m.kv_cache.num_layers)]


def assert_reads(m, seq_id, k, v):
    """The sequence's gathered K/V equal ``k, v: [num_layers, num_tokens, H, D]`` exactly."""
    for layer, (gk, gv) in enumerate(gathered(m, seq_id)):
        np.testing.assert_array_equal(gk, k[layer])
        np.testing.assert_array_equal(gv, v[layer])


def state(m):
    """Everything a failed call must leave alone: bookkeeping, allocator and the cache's bytes."""
    c = m.kv_cache
    return m.snapshot(), m.block_manager.snapshot(), m.usage(), c.k_pool.copy(), c.v_pool.copy()


def assert_same_state(m, before):
    after = state(m)
    assert after[:3] == before[:3]
    for a, b in zip(after[3:], before[3:]):
        np.testing.assert_array_equal(a, b)  # NaN == NaN here
        assert a.tobytes() == b.tobytes()  # and bit for bit
    m.block_manager.check_invariants()


def names(msg: str, value) -> bool:
    return re.search(rf"(?<![\d-]){re.escape(str(value))}(?!\d)", msg) is not None


def assert_refused(m, exc_type, fn, *args, value, **kwargs):
    before = state(m)
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert names(str(info.value), value), f"message {str(info.value)!r} does not name {value!r}"
    assert_same_state(m, before)
    return info.value


def changed_blocks(before, after):
    """Ids of the blocks whose bytes differ (NaN == NaN) between two pools."""
    diff = (before != after) & ~(np.isnan(before) & np.isnan(after))
    return set(np.argwhere(diff)[:, 1].tolist())


def refs(m):
    return list(m.block_manager.snapshot()[1])


# -- step by step ---------------------------------------------------------------------------------
def test_add_reserves_ceil_blocks_and_writes_prompt():
    rng = np.random.default_rng(0)
    m = make(num_blocks=8, block_size=4)
    k, v = kv(rng, m, 6)
    s = m.add_sequence(6, k=k, v=v)
    # seq s: [ 0: t0..t3 ][ 1: t4 t5 . . ]          free: [2 3 4 5 6 7]
    assert m.seq_ids == [s]
    assert m.block_table(s) == [0, 1] and m.context_len(s) == 6
    assert m.block_manager.snapshot()[0] == (2, 3, 4, 5, 6, 7)
    assert refs(m)[:2] == [1, 1]
    assert_reads(m, s, k, v)
    # the two slots nobody wrote are still NaN
    assert np.isnan(m.kv_cache.k_pool[:, 1, :, 2:]).all() and np.isnan(m.kv_cache.v_pool[:, 1, :, 2:]).all()
    np.testing.assert_array_equal(m.slots(s, 0, 6), [0, 1, 2, 3, 4, 5])


def test_add_without_kv_only_reserves():
    m = make(num_blocks=4, block_size=4)
    before = m.kv_cache.k_pool.tobytes()
    s = m.add_sequence(5)
    assert m.block_table(s) == [0, 1] and m.context_len(s) == 5
    assert m.kv_cache.k_pool.tobytes() == before


def test_append_token_takes_a_new_block_only_at_a_boundary():
    rng = np.random.default_rng(1)
    m = make(num_blocks=8, block_size=4)
    k, v = kv(rng, m, 3)
    s = m.add_sequence(3, k=k, v=v)
    # seq: [ 0: t0 t1 t2 . ]                         free: [1 2 3 4 5 6 7]
    ks, vs = [k], [v]
    expected_tables = {4: [0], 5: [0, 1], 6: [0, 1], 8: [0, 1], 9: [0, 1, 2]}
    for n in range(4, 10):
        k1, v1 = kv(rng, m)
        slot = m.append_token(s, k=k1, v=v1)
        ks.append(k1[:, None])
        vs.append(v1[:, None])
        table = m.block_table(s)
        assert slot == table[(n - 1) // 4] * 4 + (n - 1) % 4
        if n in expected_tables:
            assert table == expected_tables[n]
        assert m.context_len(s) == n
        assert m.block_manager.num_used_blocks == -(-n // 4)
    # seq: [ 0: t0..t3 ][ 1: t4..t7 ][ 2: t8 . . . ]  free: [3 4 5 6 7]
    assert_reads(m, s, np.concatenate(ks, axis=1), np.concatenate(vs, axis=1))
    assert m.usage().num_cow_copies == 0


def test_append_slots_returns_the_new_positions_slots():
    m = make(num_blocks=8, block_size=4)
    s = m.add_sequence(2)
    other = m.add_sequence(4)  # takes block 1 so s's next block is not adjacent
    assert m.block_table(other) == [1]
    slots = m.append_slots(s, 7)
    # s: [ 0: t0..t3 ][ 2: t4..t7 ][ 3: t8 . . . ]
    assert m.block_table(s) == [0, 2, 3]
    np.testing.assert_array_equal(slots, [2, 3, 8, 9, 10, 11, 12])
    assert slots.dtype == np.int64


def test_fork_shares_every_block_and_copies_no_kv():
    rng = np.random.default_rng(2)
    m = make(num_blocks=8, block_size=4)
    k, v = kv(rng, m, 6)
    p = m.add_sequence(6, k=k, v=v)
    pool_before = m.kv_cache.k_pool.tobytes(), m.kv_cache.v_pool.tobytes()
    c = m.fork_sequence(p)
    # parent, child: [ 0 (ref 2) ][ 1 (ref 2) ]      free: [2 .. 7]
    assert c != p and sorted(m.seq_ids) == sorted([p, c])
    assert m.block_table(c) == m.block_table(p) == [0, 1]
    assert m.context_len(c) == 6
    assert refs(m)[:3] == [2, 2, 0]
    assert m.block_manager.num_used_blocks == 2
    assert (m.kv_cache.k_pool.tobytes(), m.kv_cache.v_pool.tobytes()) == pool_before
    assert_reads(m, c, k, v)
    assert m.usage().num_cow_copies == 0


def test_copy_on_write_append_in_child():
    rng = np.random.default_rng(3)
    m = make(num_blocks=8, block_size=4)
    k, v = kv(rng, m, 6)
    p = m.add_sequence(6, k=k, v=v)
    c = m.fork_sequence(p)
    block1_before = m.kv_cache.k_pool[:, 1].copy(), m.kv_cache.v_pool[:, 1].copy()

    kc, vc = kv(rng, m)
    slot = m.append_token(c, k=kc, v=vc)
    # parent: [ 0 (ref 2) ][ 1: t4 t5 . . ]
    # child:  [ 0 (ref 2) ][ 2: t4 t5 t6' . ]        exactly one copy: 1 -> 2
    assert m.usage().num_cow_copies == 1
    assert m.block_table(p) == [0, 1] and m.block_table(c) == [0, 2]
    assert refs(m)[:4] == [2, 1, 1, 0]
    assert slot == 2 * 4 + 2
    # the parent's data is intact, block 1 untouched, block 2 starts as block 1's copy
    assert_reads(m, p, k, v)
    np.testing.assert_array_equal(m.kv_cache.k_pool[:, 1], block1_before[0])
    np.testing.assert_array_equal(m.kv_cache.v_pool[:, 1], block1_before[1])
    np.testing.assert_array_equal(m.kv_cache.k_pool[:, 2, :, :2], block1_before[0][:, :, :2])
    assert_reads(m, c, np.concatenate([k, kc[:, None]], 1), np.concatenate([v, vc[:, None]], 1))

    # the parent appends after the child diverged: its block 1 has ref 1 now, so no copy
    kp, vp = kv(rng, m)
    m.append_token(p, k=kp, v=vp)
    assert m.usage().num_cow_copies == 1
    assert m.block_table(p) == [0, 1]
    assert_reads(m, p, np.concatenate([k, kp[:, None]], 1), np.concatenate([v, vp[:, None]], 1))
    assert_reads(m, c, np.concatenate([k, kc[:, None]], 1), np.concatenate([v, vc[:, None]], 1))


def test_copy_on_write_the_first_writer_copies():
    """The parent writing first after a fork gets the copy; the child keeps the original block."""
    rng = np.random.default_rng(4)
    m = make(num_blocks=8, block_size=4)
    k, v = kv(rng, m, 5)
    p = m.add_sequence(5, k=k, v=v)
    c = m.fork_sequence(p)
    kp, vp = kv(rng, m)
    m.append_token(p, k=kp, v=vp)
    assert m.block_table(p) == [0, 2] and m.block_table(c) == [0, 1]
    assert m.usage().num_cow_copies == 1
    assert_reads(m, c, k, v)
    kc, vc = kv(rng, m)
    m.append_token(c, k=kc, v=vc)  # the child now owns block 1 alone: no copy
    assert m.usage().num_cow_copies == 1 and m.block_table(c) == [0, 1]
    assert_reads(m, p, np.concatenate([k, kp[:, None]], 1), np.concatenate([v, vp[:, None]], 1))
    assert_reads(m, c, np.concatenate([k, kc[:, None]], 1), np.concatenate([v, vc[:, None]], 1))


def test_fork_at_a_block_boundary_needs_no_copy():
    rng = np.random.default_rng(5)
    m = make(num_blocks=8, block_size=4)
    k, v = kv(rng, m, 8)
    p = m.add_sequence(8, k=k, v=v)
    c = m.fork_sequence(p)
    kc, vc = kv(rng, m)
    m.append_token(c, k=kc, v=vc)
    # child: [ 0 (ref 2) ][ 1 (ref 2) ][ 2: t8' . . . ]   full blocks are never written again
    assert m.usage().num_cow_copies == 0
    assert m.block_table(c) == [0, 1, 2] and refs(m)[:3] == [2, 2, 1]
    assert_reads(m, p, k, v)


def test_three_way_fork_copies_once_per_writer_but_the_last():
    rng = np.random.default_rng(6)
    m = make(num_blocks=8, block_size=4)
    k, v = kv(rng, m, 2)
    p = m.add_sequence(2, k=k, v=v)
    c1, c2 = m.fork_sequence(p), m.fork_sequence(p)
    assert refs(m)[0] == 3
    rows = {}
    for s in (c1, c2, p):
        k1, v1 = kv(rng, m)
        m.append_token(s, k=k1, v=v1)
        rows[s] = k1, v1
    assert m.usage().num_cow_copies == 2  # c1 and c2 copy; p is then the only owner of block 0
    assert m.block_table(p) == [0]
    assert len({m.block_table(s)[0] for s in (p, c1, c2)}) == 3
    for s, (k1, v1) in rows.items():
        assert_reads(m, s, np.concatenate([k, k1[:, None]], 1), np.concatenate([v, v1[:, None]], 1))


def test_append_slots_many_with_copy_on_write():
    m = make(num_blocks=8, block_size=4)
    p = m.add_sequence(3)
    c = m.fork_sequence(p)
    slots = m.append_slots(c, 6)
    # child: [ 1: copy of 0, t3..t3 ][ 2: t4..t7 ][ 3: t8 ]
    assert m.block_table(c) == [1, 2, 3] and m.block_table(p) == [0]
    np.testing.assert_array_equal(slots, [7, 8, 9, 10, 11, 12])
    assert m.usage().num_cow_copies == 1 and refs(m)[:4] == [1, 1, 1, 1]


def test_free_sequence_drops_references():
    m = make(num_blocks=6, block_size=4)
    p = m.add_sequence(6)
    c = m.fork_sequence(p)
    m.append_slots(c, 3)  # c: [0][2][3]   (copy of 1 into 2, then 3)
    # free: [4 5]
    m.free_sequence(p)
    # 0 still held by c; 1 had refs 1 (the copy dropped one): freed     free: [4 5 1]
    assert m.seq_ids == [c]
    assert m.block_manager.snapshot()[0] == (4, 5, 1)
    assert refs(m) == [1, 0, 1, 1, 0, 0]
    m.free_sequence(c)
    # free: [4 5 1 0 2 3]
    assert m.block_manager.snapshot()[0] == (4, 5, 1, 0, 2, 3)
    assert refs(m) == [0] * 6 and m.seq_ids == []


# -- usage figures ---------------------------------------------------------------------------------
def test_usage_figures():
    rng = np.random.default_rng(7)
    m = make(num_blocks=8, block_size=4)
    bpb = 2 * L * H * 4 * D * 4  # K and V, every layer, float32
    assert m.kv_cache.bytes_per_block == bpb
    u = m.usage()
    assert (u.num_used_blocks, u.num_free_blocks, u.num_sequences, u.utilization, u.bytes_used) == (0, 8, 0, 1.0, 0)
    assert u.bytes_total == 8 * bpb == m.kv_cache.total_bytes

    k, v = kv(rng, m, 6)
    p = m.add_sequence(6, k=k, v=v)
    u = m.usage()
    assert (u.num_blocks, u.num_used_blocks, u.num_free_blocks) == (8, 2, 6)
    assert (u.num_token_slots_used, u.num_token_slots_reserved, u.num_logical_tokens) == (6, 8, 6)
    assert u.utilization == 0.75 and u.bytes_used == 2 * bpb and u.bytes_per_block == bpb
    assert (u.num_shared_blocks, u.num_cow_copies, u.num_sequences) == (0, 0, 1)

    c = m.fork_sequence(p)
    u = m.usage()
    # a shared block counts once in the pool but twice in the logical tokens
    assert (u.num_used_blocks, u.num_token_slots_used, u.num_logical_tokens, u.num_shared_blocks) == (2, 6, 12, 2)
    assert u.num_sequences == 2

    kc, vc = kv(rng, m)
    m.append_token(c, k=kc, v=vc)
    u = m.usage()
    # blocks: 0 (4 filled, shared), 1 (parent, 2 filled), 2 (child's copy, 3 filled)
    assert (u.num_used_blocks, u.num_token_slots_used, u.num_token_slots_reserved) == (3, 9, 12)
    assert (u.num_logical_tokens, u.num_shared_blocks, u.num_cow_copies) == (13, 1, 1)
    assert u.utilization == 9 / 12 and u.bytes_used == 3 * bpb

    m.free_sequence(p)
    m.free_sequence(c)
    u = m.usage()
    assert (u.num_used_blocks, u.num_free_blocks, u.num_logical_tokens, u.num_sequences) == (0, 8, 0, 0)
    assert u.num_cow_copies == 1  # a running total


# -- batch outputs ---------------------------------------------------------------------------------
def test_batch_outputs():
    m = make(num_blocks=12, block_size=4)
    a = m.add_sequence(3)   # [0]
    b = m.add_sequence(9)   # [1 2 3]
    c = m.add_sequence(4)   # [4]
    m.free_sequence(a)      # free: [5 .. 11 0]
    d = m.add_sequence(5)   # [5 6]
    ids = [b, c, d]
    tables = m.block_tables(ids)
    assert tables.dtype == np.int32 and tables.shape == (3, 3)
    np.testing.assert_array_equal(tables, [[1, 2, 3], [4, 0, 0], [5, 6, 0]])
    lens = m.context_lens(ids)
    assert lens.dtype == np.int32
    np.testing.assert_array_equal(lens, [9, 4, 5])
    slots = m.slot_mapping(ids)
    # the last token of each: b t8 -> block 3 offset 0; c t3 -> block 4 offset 3; d t4 -> block 6 offset 0
    np.testing.assert_array_equal(slots, [12, 19, 24])
    for s, slot in zip(ids, slots):
        assert slot == m.slots(s, m.context_len(s) - 1, m.context_len(s))[0]
    np.testing.assert_array_equal(m.block_tables([d, d]), [[5, 6], [5, 6]])


@pytest.mark.parametrize("group", [1, 2])
def test_attention_matches_dense_reference(group):
    rng = np.random.default_rng(8 + group)
    m = make(num_blocks=16, block_size=4)
    lens = [1, 4, 7, 9]
    data = {}
    for n in lens:
        k, v = kv(rng, m, n)
        data[m.add_sequence(n, k=k, v=v)] = k, v
    p = next(iter(data))
    c = m.fork_sequence(p)
    kc, vc = kv(rng, m)
    m.append_token(c, k=kc, v=vc)
    k, v = data[p]
    data[c] = np.concatenate([k, kc[:, None]], 1), np.concatenate([v, vc[:, None]], 1)
    ids = list(data)
    q = rng.standard_normal((len(ids), H * group, D)).astype(np.float32)
    for layer in range(L):
        out = m.attention(q, ids, layer)
        assert out.shape == q.shape and out.dtype == np.float32
        for i, s in enumerate(ids):
            ref = dense_attention(q[i : i + 1], data[s][0][layer], data[s][1][layer])[0]
            np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=1e-6)


# -- bad input: a ValueError naming the value, and nothing changes ---------------------------------
@pytest.fixture
def busy():
    """A manager with a parent, a forked child and one more sequence, data written everywhere."""
    rng = np.random.default_rng(9)
    m = make(num_blocks=8, block_size=4)
    k, v = kv(rng, m, 6)
    p = m.add_sequence(6, k=k, v=v)
    c = m.fork_sequence(p)
    k, v = kv(rng, m, 3)
    o = m.add_sequence(3, k=k, v=v)
    return m, (p, c, o), rng


@pytest.mark.parametrize("call", [
    lambda m, s, q: m.append_token(s), lambda m, s, q: m.append_slots(s, 1), lambda m, s, q: m.fork_sequence(s),
    lambda m, s, q: m.free_sequence(s), lambda m, s, q: m.context_len(s), lambda m, s, q: m.block_table(s),
    lambda m, s, q: m.slots(s, 0, 1), lambda m, s, q: m.can_append(s), lambda m, s, q: m.block_tables([0, s]),
    lambda m, s, q: m.context_lens([s]), lambda m, s, q: m.slot_mapping([1, s]),
    lambda m, s, q: m.attention(q, [0, s], 0),
])
@pytest.mark.parametrize("bad_id", [999, -1, "x"])
def test_unknown_sequence_id(busy, call, bad_id):
    m, _, rng = busy
    q = rng.standard_normal((2, H, D)).astype(np.float32)
    assert_refused(m, ValueError, call, m, bad_id, q, value=repr(bad_id))


def test_append_token_with_kv_to_unknown_id(busy):
    m, _, rng = busy
    k1, v1 = kv(rng, m)
    assert_refused(m, ValueError, m.append_token, 77, k=k1, v=v1, value=77)


def test_freed_sequence_is_unknown(busy):
    m, (_p, _c, o), _ = busy
    m.free_sequence(o)
    assert_refused(m, ValueError, m.free_sequence, o, value=o)
    assert_refused(m, ValueError, m.append_token, o, value=o)


@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_bad_sizes(busy, bad):
    m, (_p, c, _o), _ = busy
    assert_refused(m, ValueError, m.add_sequence, bad, value=repr(bad))
    assert_refused(m, ValueError, m.append_slots, c, bad, value=repr(bad))
    assert_refused(m, ValueError, m.can_add, bad, value=repr(bad))


@pytest.mark.parametrize("field", range(5))
@pytest.mark.parametrize("bad", [0, -2])
def test_bad_cache_sizes(field, bad):
    sizes = [1, 4, 4, 2, 8]
    sizes[field] = bad
    with pytest.raises(ValueError, match=rf"(num_layers|num_blocks|block_size|num_kv_heads|head_dim).*{bad}"):
        PagedAttentionManager.create(*sizes, "float32", "cpu")
    with pytest.raises(ValueError, match=str(bad)):
        KVCache(*sizes, "float32", "cpu")


def test_memory_budget_below_one_block():
    per_block = KVCache.block_bytes(2, 4, 2, 8, "float16")
    assert per_block == 2 * 2 * 4 * 2 * 8 * 2
    c = KVCache.from_memory_budget(per_block * 5 + 7, num_layers=2, block_size=4, num_kv_heads=2, head_dim=8,
                                   device="cpu")
    assert c.num_blocks == 5 and c.total_bytes == 5 * per_block
    with pytest.raises(ValueError, match=str(per_block - 1)):
        KVCache.from_memory_budget(per_block - 1, num_layers=2, block_size=4, num_kv_heads=2, head_dim=8,
                                   device="cpu")


def test_heads_not_divisible(busy):
    m, (p, _c, o), rng = busy
    q = rng.standard_normal((2, 3, D)).astype(np.float32)  # 3 query heads over 2 KV heads
    assert_refused(m, ValueError, m.attention, q, [p, o], 0, value=3)


def test_bad_layer(busy):
    m, (p, _c, _o), rng = busy
    q = rng.standard_normal((1, H, D)).astype(np.float32)
    assert_refused(m, ValueError, m.attention, q, [p], L, value=L)
    assert_refused(m, ValueError, m.attention, q, [p], -1, value=-1)


@pytest.mark.parametrize("shape, dtype, bad", [
    ((2, H, D), np.float64, "float64"),       # wrong dtype
    ((2, H, D), np.float16, "float16"),
    ((2, H, D + 1), np.float32, D + 1),       # wrong head dim
    ((2, H * D), np.float32, H * D),          # wrong rank
    ((3, H, D), np.float32, 3),               # batch differs from the number of sequences
])
def test_bad_query(busy, shape, dtype, bad):
    m, (p, _c, o), rng = busy
    q = rng.standard_normal(shape).astype(dtype)
    assert_refused(m, ValueError, m.attention, q, [p, o], 0, value=bad)


def _bad_kv(m, rng, tokens, which):
    k, v = kv(rng, m, *tokens)
    c = m.kv_cache
    if which == "dtype":
        return k.astype(np.float64), v, "float64"
    if which == "v_dtype":
        return k, v.astype(np.float16), "float16"
    if which == "heads":
        return rng.standard_normal((c.num_layers, *tokens, c.num_kv_heads + 1, c.head_dim)).astype(c.dtype), v, \
            c.num_kv_heads + 1
    if which == "head_dim":
        return k, rng.standard_normal((c.num_layers, *tokens, c.num_kv_heads, 7)).astype(c.dtype), 7
    if which == "layers":
        return k[:1], v[:1], 1
    raise AssertionError(which)


@pytest.mark.parametrize("which", ["dtype", "v_dtype", "heads", "head_dim", "layers"])
def test_bad_kv_on_add(busy, which):
    m, _, rng = busy
    k, v, bad = _bad_kv(m, rng, (5,), which)
    assert_refused(m, ValueError, m.add_sequence, 5, k=k, v=v, value=bad)


def test_kv_for_the_wrong_number_of_tokens(busy):
    m, _, rng = busy
    k, v = kv(rng, m, 4)
    assert_refused(m, ValueError, m.add_sequence, 5, k=k, v=v, value=4)


@pytest.mark.parametrize("which", ["dtype", "v_dtype", "heads", "head_dim", "layers"])
def test_bad_kv_on_append(busy, which):
    m, (_p, c, _o), rng = busy
    k, v, bad = _bad_kv(m, rng, (), which)
    # c shares a partial block: a valid append would copy it, so "nothing changed" is a real check
    assert_refused(m, ValueError, m.append_token, c, k=k, v=v, value=bad)


def test_only_one_of_k_and_v(busy):
    m, (_p, c, _o), rng = busy
    k, v = kv(rng, m, 2)
    before = state(m)
    with pytest.raises(ValueError, match="both"):
        m.add_sequence(2, k=k)
    with pytest.raises(ValueError, match="both"):
        m.append_token(c, v=v[:, 0])
    assert_same_state(m, before)


def test_bad_positions_for_slots(busy):
    m, (p, _c, _o), _ = busy
    assert_refused(m, ValueError, m.slots, p, 0, 7, value=7)
    assert_refused(m, ValueError, m.slots, p, -1, 2, value=-1)
    assert_refused(m, ValueError, m.slots, p, 3, 2, value=3)


def test_empty_batch(busy):
    m, _, _ = busy
    for fn in (m.block_tables, m.context_lens, m.slot_mapping):
        before = state(m)
        with pytest.raises(ValueError, match="empty"):
            fn([])
        assert_same_state(m, before)


def test_pool_exhausted_on_add(busy):
    m, _, _ = busy
    # used: 0 1 (shared by p and c), 2 (o)       free: [3 4 5 6 7]
    err = assert_refused(m, OutOfBlocksError, m.add_sequence, 21, value=6)  # 21 tokens need 6 blocks
    assert names(str(err), 5) and isinstance(err, ValueError)  # requested 6, 5 free
    assert not m.can_add(21) and m.can_add(20)


def test_pool_exhausted_at_a_block_boundary():
    rng = np.random.default_rng(10)
    m = make(num_blocks=2, block_size=4)
    k, v = kv(rng, m, 8)
    s = m.add_sequence(8, k=k, v=v)
    k1, v1 = kv(rng, m)
    assert not m.can_append(s)
    assert_refused(m, OutOfBlocksError, m.append_token, s, k=k1, v=v1, value=1)


def test_pool_exhausted_when_copy_on_write_needs_a_block():
    rng = np.random.default_rng(11)
    m = make(num_blocks=2, block_size=4)
    k, v = kv(rng, m, 6)
    p = m.add_sequence(6, k=k, v=v)
    c = m.fork_sequence(p)
    # p, c: [0 (ref 2)][1 (ref 2), t4 t5 . .]       free: []   -> the copy of block 1 has nowhere to go
    k1, v1 = kv(rng, m)
    assert not m.can_append(c) and not m.can_append(p)
    assert_refused(m, OutOfBlocksError, m.append_token, c, k=k1, v=v1, value=1)
    assert_refused(m, OutOfBlocksError, m.append_slots, p, 3, value=2)  # a copy and one more block
    assert_reads(m, p, k, v)
    assert_reads(m, c, k, v)


def test_failed_add_leaves_the_next_sequence_id_unchanged():
    """"Exactly as before": a manager that saw a refused add behaves like one that did not."""
    twins = make(num_blocks=2, block_size=4), make(num_blocks=2, block_size=4)
    for m in twins:
        m.add_sequence(4)
    with pytest.raises(OutOfBlocksError):
        twins[1].add_sequence(9)
    assert twins[0].add_sequence(4) == twins[1].add_sequence(4)
    assert twins[0].snapshot() == twins[1].snapshot()


# -- the cache's own bad input -----------------------------------------------------------------------
def test_cache_gather_bad_block_table_and_length(busy):
    m = busy[0]
    cache = m.kv_cache
    for table, n, bad in [([0, 99], 6, 99), ([0, 8], 5, 8), ([-1, 1], 6, -1), ([0], 5, 5), ([0, 1], 9, 9),
                          ([0, 1], -1, -1)]:
        before = state(m)
        with pytest.raises(ValueError) as info:
            cache.gather(0, table, n)
        assert names(str(info.value), bad), str(info.value)
        assert_same_state(m, before)
    for layer in (L, -1):
        with pytest.raises(ValueError, match=str(layer)):
            cache.gather(layer, [0], 1)
    # entries past the used ones are never read, so they may be anything
    k, _ = cache.gather(0, [2, 99, -5], 3)
    np.testing.assert_array_equal(k, cache.k_pool[0, 2].transpose(1, 0, 2)[:3])


def test_cache_write_bad_input_changes_nothing(busy):
    m, _, rng = busy
    cache = m.kv_cache
    k = rng.standard_normal((2, H, D)).astype(np.float32)
    for slots, kk, bad in [([0, 32], k, 32), ([0, -2], k, -2), ([5, 5], k, "twice"),
                           ([0, 1], k.astype(np.float16), "float16"), ([0, 1, 2], k, 3)]:
        before = state(m)
        with pytest.raises(ValueError) as info:
            cache.write(0, np.array(slots), kk, kk)
        assert names(str(info.value), bad) or bad in str(info.value), str(info.value)
        assert_same_state(m, before)


# -- the state machine --------------------------------------------------------------------------------
class ManagerMachine(RuleBasedStateMachine):
    """PagedAttentionManager beside a plain model: per sequence, the K and V rows it has written.

    After every step each live sequence's gather through its block table equals its own rows exactly
    (so no write ever leaks into a sibling through a shared block), ref counts equal the number of
    tables holding a block, and usage agrees with both.
    """

    @initialize(num_blocks=st.integers(2, 14), block_size=st.sampled_from([1, 2, 4]),
                num_layers=st.integers(1, 2), num_kv_heads=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1))
    def setup(self, num_blocks, block_size, num_layers, num_kv_heads, seed):
        self.m = make(num_blocks, block_size, num_layers, num_kv_heads, head_dim=4)
        self.bs = block_size
        self.rng = np.random.default_rng(seed)
        self.rows: dict[int, tuple[list, list]] = {}  # seq id -> (K rows, V rows), each [num_layers, H, D]
        self.copies = 0

    def _fresh(self):
        return kv(self.rng, self.m)

    def _refused(self, exc_type, fn, *args, **kwargs):
        before = state(self.m)
        with pytest.raises(exc_type):
            fn(*args, **kwargs)
        assert_same_state(self.m, before)

    @rule(n=st.integers(1, 12))
    def add(self, n):
        rows = [self._fresh() for _ in range(n)]
        k = np.stack([r[0] for r in rows], axis=1)
        v = np.stack([r[1] for r in rows], axis=1)
        if -(-n // self.bs) > self.m.block_manager.num_free_blocks:
            self._refused(OutOfBlocksError, self.m.add_sequence, n, k=k, v=v)
            return
        s = self.m.add_sequence(n, k=k, v=v)
        assert s not in self.rows
        self.rows[s] = [r[0] for r in rows], [r[1] for r in rows]

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def append(self, data):
        s = data.draw(st.sampled_from(sorted(self.rows)), "seq")
        n = len(self.rows[s][0])
        table = self.m.block_table(s)
        partial = n % self.bs != 0
        shared = partial and sum(t.count(table[-1]) for t in map(self.m.block_table, self.rows)) > 1
        need = int(not partial) + int(shared)
        k1, v1 = self._fresh()
        if need > self.m.block_manager.num_free_blocks:
            assert not self.m.can_append(s)
            self._refused(OutOfBlocksError, self.m.append_token, s, k=k1, v=v1)
            return
        assert self.m.can_append(s)
        pool_before, v_before = self.m.kv_cache.k_pool.copy(), self.m.kv_cache.v_pool.copy()
        slot = self.m.append_token(s, k=k1, v=v1)
        new_table = self.m.block_table(s)
        if shared:  # exactly one copy, into a block that was free, replacing only the last entry
            self.copies += 1
            assert new_table[:-1] == table[:-1] and new_table[-1] != table[-1]
            assert self.m.block_manager.ref_count(table[-1]) >= 1
        elif partial:
            assert new_table == table
        else:
            assert new_table[:-1] == table and len(new_table) == len(table) + 1
        assert slot == new_table[n // self.bs] * self.bs + n % self.bs
        # only the new slot and, for a copy, the fresh block changed
        assert changed_blocks(pool_before, self.m.kv_cache.k_pool) <= {new_table[-1]}
        assert changed_blocks(v_before, self.m.kv_cache.v_pool) <= {new_table[-1]}
        self.rows[s][0].append(k1)
        self.rows[s][1].append(v1)

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def fork(self, data):
        s = data.draw(st.sampled_from(sorted(self.rows)), "seq")
        pool_before = self.m.kv_cache.k_pool.tobytes(), self.m.kv_cache.v_pool.tobytes()
        used_before = self.m.block_manager.num_used_blocks
        c = self.m.fork_sequence(s)
        assert c not in self.rows
        assert self.m.block_table(c) == self.m.block_table(s)
        assert (self.m.kv_cache.k_pool.tobytes(), self.m.kv_cache.v_pool.tobytes()) == pool_before  # no KV copied
        assert self.m.block_manager.num_used_blocks == used_before
        self.rows[c] = list(self.rows[s][0]), list(self.rows[s][1])

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def free(self, data):
        s = data.draw(st.sampled_from(sorted(self.rows)), "seq")
        self.m.free_sequence(s)
        del self.rows[s]

    @rule(bad=st.sampled_from([-1, 10_000]))
    def unknown_id(self, bad):
        for fn in (self.m.append_token, self.m.fork_sequence, self.m.free_sequence):
            self._refused(ValueError, fn, bad)

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def bad_kv(self, data):
        s = data.draw(st.sampled_from(sorted(self.rows)), "seq")
        k1, v1 = self._fresh()
        self._refused(ValueError, self.m.append_token, s, k=k1.astype(np.float64), v=v1)
        self._refused(ValueError, self.m.append_token, s, k=k1, v=v1[..., :-1])

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def every_sequence_reads_its_own_rows(self):
        for s, (ks, vs) in self.rows.items():
            assert self.m.context_len(s) == len(ks)
            assert len(self.m.block_table(s)) == -(-len(ks) // self.bs)
            assert_reads(self.m, s, np.stack(ks, axis=1), np.stack(vs, axis=1))

    @invariant()
    def allocator_invariants(self):
        bm = self.m.block_manager
        bm.check_invariants()
        free, counts = bm.snapshot()[:2]
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        assert len(set(free)) == len(free)
        tables = [self.m.block_table(s) for s in self.rows]
        holders = {}
        for t in tables:
            for b in t:
                holders[b] = holders.get(b, 0) + 1
        # every block's ref count is the number of tables holding it; nothing else is used
        assert list(counts) == [holders.get(b, 0) for b in range(bm.num_blocks)]
        assert sorted(self.m.seq_ids) == sorted(self.rows)

    @invariant()
    def usage_is_consistent(self):
        u, bm, bs = self.m.usage(), self.m.block_manager, self.bs
        _, counts = bm.snapshot()[:2]
        filled = {}
        for s, (ks, _) in self.rows.items():
            for i, b in enumerate(self.m.block_table(s)):
                filled[b] = max(filled.get(b, 0), min(bs, len(ks) - i * bs))
        assert (u.num_blocks, u.num_used_blocks, u.num_free_blocks) == (bm.num_blocks, len(filled),
                                                                         bm.num_blocks - len(filled))
        assert u.num_token_slots_used == sum(filled.values()) <= u.num_token_slots_reserved == len(filled) * bs
        assert u.num_logical_tokens == sum(len(ks) for ks, _ in self.rows.values())
        assert u.num_shared_blocks == sum(1 for c in counts if c > 1)
        assert u.num_cow_copies == self.copies and u.num_sequences == len(self.rows)
        assert 0 < u.utilization <= 1 and u.bytes_used == len(filled) * self.m.kv_cache.bytes_per_block


TestManagerMachine = ManagerMachine.TestCase


# -- issue 8, finding 8: ids must be real ints ---------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda m, s, q: m.append_token(s), lambda m, s, q: m.append_slots(s, 1), lambda m, s, q: m.fork_sequence(s),
    lambda m, s, q: m.free_sequence(s), lambda m, s, q: m.context_len(s), lambda m, s, q: m.block_table(s),
    lambda m, s, q: m.slots(s, 0, 1), lambda m, s, q: m.can_append(s), lambda m, s, q: m.block_tables([0, s]),
    lambda m, s, q: m.context_lens([s]), lambda m, s, q: m.slot_mapping([0, s]),
    lambda m, s, q: m.attention(q, [0, s], 0), lambda m, s, q: m.num_cached_tokens(s),
    lambda m, s, q: m.register_blocks(s, []),
])
@pytest.mark.parametrize("bad_id", [True, False, 1.0, 0.0, "1"])
def test_sequence_ids_must_be_real_ints(busy, call, bad_id):
    """``free_sequence(True)`` used to free sequence 1 (True == 1 as a dict key); 1.0 did the same."""
    m, _, rng = busy
    q = rng.standard_normal((2, H, D)).astype(np.float32)
    assert_refused(m, ValueError, call, m, bad_id, q, value=repr(bad_id))


def test_numpy_integer_sequence_ids_are_accepted(busy):
    m, (p, c, _o), _ = busy
    assert m.context_len(np.int64(p)) == 6 and m.block_table(np.int32(c)) == m.block_table(c)
    m.free_sequence(np.int64(c))
    assert c not in m.seq_ids


# == prefix caching ===================================================================================
HASHER = BlockHasher.for_model("test", "float32", 4)


def make_caching(num_blocks=8, block_size=4, **kwargs):
    m = PagedAttentionManager.create(kwargs.get("num_layers", L), num_blocks, block_size,
                                     kwargs.get("num_kv_heads", H), kwargs.get("head_dim", D), "float32", "cpu",
                                     enable_prefix_caching=True)
    m.kv_cache.k_pool[...] = np.nan
    m.kv_cache.v_pool[...] = np.nan
    return m


class PrefixKV:
    """What a model would write: the K/V of position t is a function of tokens[0..t] (so equal prefixes
    give equal K/V and a block from the cache is right exactly when its prefix is)."""

    def __init__(self, m):
        c = m.kv_cache
        self.shape = (c.num_layers, c.num_kv_heads, c.head_dim)
        self.rows: dict[tuple, tuple] = {}

    def row(self, prefix: tuple):
        if prefix not in self.rows:
            seed = int.from_bytes(hashlib.sha256(np.array(prefix, "<i8").tobytes()).digest()[:8], "little")
            k, v = np.random.default_rng(seed).standard_normal((2, *self.shape)).astype(np.float32)
            self.rows[prefix] = k, v
        return self.rows[prefix]

    def __call__(self, tokens):
        """``k, v: [num_layers, len(tokens), num_kv_heads, head_dim]``."""
        key = ("all", *tokens)
        if key not in self.rows:
            rows = [self.row(tuple(tokens[: t + 1])) for t in range(len(tokens))]
            self.rows[key] = tuple(np.stack([r[i] for r in rows], axis=1) for i in (0, 1))
        return self.rows[key]


def lru(m):
    return list(m.block_manager.snapshot().evictable_ids)


def reads_exactly(m, table, n, k, v) -> bool:
    """Whether gathering ``n`` tokens through ``table`` gives ``k, v: [num_layers, n, H, D]`` bit for bit
    (a fast check for the state machine; NaN, i.e. a slot nobody wrote, never matches)."""
    return all(np.array_equal(gk, k[layer]) and np.array_equal(gv, v[layer])
               for layer in range(m.kv_cache.num_layers) for gk, gv in [m.kv_cache.gather(layer, table, n)])


def test_cached_prefix_step_by_step():
    m = make_caching(8, 4)
    kvf = PrefixKV(m)
    doc = list(range(100, 108))                      # two full blocks of a shared document
    a_tokens = doc + [1, 2]
    ka, va = kvf(a_tokens)
    a = m.add_sequence(10, k=ka, v=va)
    # a: [ 0: t0..t3 ][ 1: t4..t7 ][ 2: t8 t9 . . ]      free: [3 4 5 6 7]
    hashes = HASHER.hash_full_blocks(a_tokens, 4)
    assert len(hashes) == 2 and m.lookup(hashes, 10) == []     # computed, not named yet
    assert m.register_blocks(a, hashes) == 2
    assert m.lookup(hashes, 10) == [0, 1] and m.register_blocks(a, hashes) == 0   # idempotent
    m.free_sequence(a)
    # released last block first:   free: [3 4 5 6 7 2]    lru: [1 0]   (the chain's tail is evicted first)
    assert m.block_manager.snapshot().free_ids == (3, 4, 5, 6, 7, 2) and lru(m) == [1, 0]
    u = m.usage()
    assert (u.num_used_blocks, u.num_free_blocks, m.block_manager.num_evictable_blocks) == (0, 8, 2)

    b_tokens = doc + [7, 8, 9]
    kb, vb = kvf(b_tokens)
    ids = m.lookup(HASHER.hash_full_blocks(b_tokens, 4), 11)
    assert ids == [0, 1]
    assert m.num_blocks_to_add(11, cached_block_ids=ids) == 3       # 1 fresh + 2 leaving the LRU
    pools = m.kv_cache.k_pool.copy(), m.kv_cache.v_pool.copy()
    b = m.add_sequence(11, k=kb[:, 8:], v=vb[:, 8:], cached_block_ids=ids)
    # b: [ 0 (cached) ][ 1 (cached) ][ 3: t8 t9 t10 . ]    free: [4 5 6 7 2]   lru: []
    assert m.block_table(b) == [0, 1, 3] and m.num_cached_tokens(b) == 8 and lru(m) == []
    assert changed_blocks(pools[0], m.kv_cache.k_pool) == {3} == changed_blocks(pools[1], m.kv_cache.v_pool)
    assert_reads(m, b, kb, vb)                                     # the cached prefix reads back exactly
    assert refs(m)[:4] == [1, 1, 0, 1]
    m.block_manager.check_invariants()


def test_fully_cached_prompt_recomputes_its_last_block():
    """At least one token is computed (for the logits): the last full block is not taken from the cache."""
    m = make_caching(8, 4)
    kvf = PrefixKV(m)
    tokens = list(range(8))
    k, v = kvf(tokens)
    a = m.add_sequence(8, k=k, v=v)
    hashes = HASHER.hash_full_blocks(tokens, 4)
    m.register_blocks(a, hashes)
    # a: [ 0: h0 ][ 1: h1 ]
    assert m.lookup(hashes, 8) == [0]           # 8 tokens: t0..t3 cached, t4..t7 recomputed
    assert m.lookup(hashes, 9) == [0, 1]        # one more token: both blocks usable, t8 computed
    assert m.lookup(hashes, 4) == [] and m.lookup(hashes, 5) == [0]
    b = m.add_sequence(8, k=k[:, 4:], v=v[:, 4:], cached_block_ids=m.lookup(hashes, 8))
    assert m.block_table(b) == [0, 2] and m.num_cached_tokens(b) == 4
    assert_reads(m, b, k, v)
    assert m.register_blocks(b, hashes) == 0    # block 2 holds h1's tokens again, but 1 is named h1
    assert m.block_manager.block_hash(2) is None


def test_eviction_takes_the_tail_of_a_chain_first():
    m = make_caching(4, 2)
    hasher = BlockHasher.for_model("test", "float32", 2)
    tokens = [5, 6, 7, 8, 9, 10]
    a = m.add_sequence(6)
    hashes = hasher.hash_full_blocks(tokens, 2)
    m.register_blocks(a, hashes)
    m.free_sequence(a)
    # free: [3]     lru: [2 1 0]
    assert lru(m) == [2, 1, 0]
    b = m.add_sequence(4)                       # takes 3, then evicts 2 (the tail, t4 t5)
    assert m.block_table(b) == [3, 2] and m.block_manager.num_evictions == 1
    assert m.lookup(hashes, 7) == [0, 1]        # the head of the chain still serves a prefix


def test_usage_counts_evictable_blocks_as_free():
    m = make_caching(6, 4)
    a = m.add_sequence(9)
    m.register_blocks(a, HASHER.hash_full_blocks(list(range(9)), 4))
    c = m.add_sequence(3)
    m.free_sequence(a)
    # used: 3 (c)    lru: [1 0]    free: [4 5 2]
    u = m.usage()
    assert (u.num_used_blocks, u.num_free_blocks, u.num_sequences) == (1, 5, 1)
    assert (u.num_token_slots_used, u.num_token_slots_reserved, u.num_logical_tokens) == (3, 4, 3)
    bm = m.block_manager
    assert (bm.num_evictable_blocks, bm.num_cached_blocks, bm.num_evictions) == (2, 2, 0)
    assert m.block_table(c) == [3]


@pytest.fixture
def cached():
    """A caching manager: sequence a (10 tokens, blocks 0 1 named, 2 partial) and sequence c (4 tokens,
    block 3 unnamed); a second named chain freed into the LRU (blocks 4 5)."""
    rng = np.random.default_rng(12)
    m = make_caching(8, 4)
    k, v = kv(rng, m, 10)
    a = m.add_sequence(10, k=k, v=v)
    m.register_blocks(a, HASHER.hash_full_blocks(list(range(10)), 4))
    c = m.add_sequence(4)
    e = m.add_sequence(8)
    m.register_blocks(e, HASHER.hash_full_blocks(list(range(50, 58)), 4))
    m.free_sequence(e)
    # a: [0 h][1 h][2]   c: [3]    lru: [5 4]    free: [6 7]
    assert lru(m) == [5, 4] and m.block_table(a) == [0, 1, 2]
    return m, a, c, rng


@pytest.mark.parametrize("ids, n, bad", [
    ([3], 8, 3),              # used, never named: holds no cached content
    ([6], 8, 6),              # free
    ([4, 4], 9, "twice"),     # duplicates
    ([0, 1], 7, 8),           # 8 cached tokens for a 7-token sequence
    ([True], 8, "True"),
    ([9], 8, 9),
    ([4, 7], 12, 7),          # all-or-nothing: 4 stays in the LRU
])
def test_bad_cached_block_ids_change_nothing(cached, ids, n, bad):
    m, *_ = cached
    assert_refused(m, ValueError, m.add_sequence, n, cached_block_ids=ids, value=bad)
    assert lru(m) == [5, 4]


def test_kv_after_a_cached_prefix_has_only_the_new_tokens(cached):
    m, _a, _c, rng = cached
    k, v = kv(rng, m, 9)
    assert_refused(m, ValueError, m.add_sequence, 9, k=k, v=v, cached_block_ids=[0, 1], value=1)  # wants 1 token
    s = m.add_sequence(9, k=k[:, 8:], v=v[:, 8:], cached_block_ids=[0, 1])
    assert m.num_cached_tokens(s) == 8 and m.block_table(s)[:2] == [0, 1]


def test_out_of_blocks_counts_the_evictable_cached_blocks(cached):
    m, _a, c, _ = cached
    m.add_sequence(8)
    # free: []     lru: [5 4]  -> 2 free blocks
    assert m.block_manager.num_free_blocks == 2
    # 4 (evictable) + 2 fresh: 3 of 2 free (allocating only the 2 fresh ones would have evicted 4 itself)
    assert m.num_blocks_to_add(12, cached_block_ids=[4]) == 3 and not m.can_add(12, cached_block_ids=[4])
    assert_refused(m, OutOfBlocksError, m.add_sequence, 12, cached_block_ids=[4], value=3)
    assert m.can_add(8, cached_block_ids=[4])
    s = m.add_sequence(8, cached_block_ids=[4])
    # fresh block: the free list is empty, so 5 is evicted (lru was [5] after 4 left it)
    assert m.block_table(s) == [4, 5] and m.block_manager.block_hash(5) is None and lru(m) == []


def test_register_blocks_errors_change_nothing(cached):
    m, a, c, _ = cached
    hashes = HASHER.hash_full_blocks(list(range(12)), 4)
    assert_refused(m, ValueError, m.register_blocks, a, hashes, value=3)      # 3 hashes, 2 full blocks
    other = HASHER.hash_full_blocks(list(range(1, 9)), 4)
    assert_refused(m, ValueError, m.register_blocks, a, other, value=0)       # block 0 holds other content
    assert_refused(m, ValueError, m.register_blocks, a, [hashes[0], "x"], value="'x'")
    assert_refused(m, ValueError, m.register_blocks, a, hashes[0], value="bytes")  # one hash, not a list
    assert_refused(m, ValueError, m.register_blocks, 99, hashes[:1], value=99)
    plain = make(4, 4)
    s = plain.add_sequence(4)
    assert_refused(plain, ValueError, plain.register_blocks, s, hashes[:1], value="disabled")
    assert plain.lookup(hashes, 9) == []


def test_the_same_tokens_computed_twice_stay_one_cached_copy():
    m = make_caching(8, 4)
    tokens = list(range(8))
    hashes = HASHER.hash_full_blocks(tokens, 4)
    a, b = m.add_sequence(8), m.add_sequence(8)         # both prefilled before either was named
    assert m.register_blocks(a, hashes) == 2 and m.register_blocks(b, hashes) == 0
    m.free_sequence(b)
    # b's copies were never named: truly free        free: [4 5 6 7 3 2]
    assert m.block_manager.snapshot().free_ids[-2:] == (3, 2) and lru(m) == []
    m.free_sequence(a)
    assert lru(m) == [1, 0] and m.block_manager.num_cached_blocks == 2


def test_copy_on_write_is_unchanged_with_a_cached_prefix():
    m = make_caching(8, 4)
    kvf = PrefixKV(m)
    tokens = list(range(6))
    k, v = kvf(tokens)
    a = m.add_sequence(6, k=k, v=v)
    m.register_blocks(a, HASHER.hash_full_blocks(tokens, 4))
    b = m.add_sequence(6, k=k[:, 4:], v=v[:, 4:], cached_block_ids=m.lookup(HASHER.hash_full_blocks(tokens, 4), 6))
    # a: [0 h0][1: t4 t5 . .]      b: [0 h0][2: t4 t5 . .]
    c = m.fork_sequence(b)
    assert m.num_cached_tokens(c) == 4 and refs(m)[:3] == [3, 1, 2]
    kc, vc = kvf(tokens + [9])
    m.append_token(c, k=kc[:, 6], v=vc[:, 6])
    # c: [0 h0][3: copy of 2, t6' .]    only the partial block is copied; block 0 is never written
    assert m.block_table(c) == [0, 3] and m.usage().num_cow_copies == 1
    assert refs(m)[:4] == [3, 1, 1, 1] and m.block_manager.block_hash(0) is not None
    assert_reads(m, c, kc, vc)
    assert_reads(m, b, k, v)


class CachingManagerMachine(RuleBasedStateMachine):
    """A caching manager driven like the engine drives it: each sequence has token ids (from a two-token
    vocabulary, so prefixes repeat), its K/V is a function of its prefixes (``PrefixKV``), a new sequence
    starts on the longest cached prefix :meth:`lookup` finds, and full blocks get named.

    After every step: each sequence reads back exactly the K/V of its own tokens (cached prefix or not),
    every named block (used or evictable) holds the K/V of the tokens its hash names (no stale hash), ref
    counts equal the tables holding a block, and named blocks sit only at full positions. At the end every
    sequence is freed and each block is free or evictable.
    """

    @initialize(num_blocks=st.integers(2, 14), block_size=st.sampled_from([1, 2, 4]),
                num_layers=st.integers(1, 2), num_kv_heads=st.sampled_from([1, 2]))
    def setup(self, num_blocks, block_size, num_layers, num_kv_heads):
        self.m = make_caching(num_blocks, block_size, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=4)
        self.bs = block_size
        self.hasher = BlockHasher.for_model("machine", "float32", block_size)
        self.kvf = PrefixKV(self.m)
        self.tokens: dict[int, list[int]] = {}
        self.named: dict[bytes, tuple] = {}   # every hash ever computed -> the tokens it names
        self.copies = 0

    def _hashes(self, tokens):
        hashes = self.hasher.hash_full_blocks(tokens, self.bs)
        for i, h in enumerate(hashes):
            self.named[h] = tuple(tokens[: (i + 1) * self.bs])
        return hashes

    def _refused(self, exc_type, fn, *args, **kwargs):
        before = state(self.m)
        with pytest.raises(exc_type):
            fn(*args, **kwargs)
        assert_same_state(self.m, before)

    @precondition(lambda self: self.named)
    @rule(data=st.data(), suffix=st.lists(st.sampled_from([0, 1]), max_size=4), register=st.booleans())
    def add_on_a_known_prefix(self, data, suffix, register):
        """A prompt that starts like an earlier one (a shared document), so the cache can serve it."""
        prefix = data.draw(st.sampled_from(sorted(self.named.values())), "prefix")
        self.add(list(prefix) + suffix or [0], register)

    @rule(tokens=st.lists(st.sampled_from([0, 1]), min_size=1, max_size=12), register=st.booleans())
    def add(self, tokens, register):
        n, hashes = len(tokens), self._hashes(tokens)
        ids = self.m.lookup(hashes, n)
        snap = self.m.block_manager.snapshot()
        owner = {h: b for b, h in enumerate(snap.block_hashes) if h is not None}
        expected = []
        for h in hashes[: (n - 1) // self.bs]:   # at least one token left to compute
            if h not in owner:
                break
            expected.append(owner[h])
        assert ids == expected
        need = -(-n // self.bs) - len(ids) + sum(1 for b in ids if b in snap.evictable_ids)
        assert self.m.num_blocks_to_add(n, cached_block_ids=ids) == need
        k, v = self.kvf(tokens)
        nc = len(ids) * self.bs
        if need > self.m.block_manager.num_free_blocks:
            self._refused(OutOfBlocksError, self.m.add_sequence, n, k=k[:, nc:], v=v[:, nc:], cached_block_ids=ids)
            return
        pools = self.m.kv_cache.k_pool.copy(), self.m.kv_cache.v_pool.copy()
        s = self.m.add_sequence(n, k=k[:, nc:], v=v[:, nc:], cached_block_ids=ids)
        table = self.m.block_table(s)
        assert table[: len(ids)] == ids and self.m.num_cached_tokens(s) == nc
        for before, after in zip(pools, (self.m.kv_cache.k_pool, self.m.kv_cache.v_pool)):
            assert changed_blocks(before, after) <= set(table[len(ids):])   # cached blocks never written
        self.tokens[s] = list(tokens)
        if ids:
            event("add: cached prefix")
        if self.m.block_manager.num_evictions > snap.num_evictions:
            event("add: evicted a cached block")
        if register:
            self.m.register_blocks(s, hashes)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), token=st.sampled_from([0, 1]))
    def append(self, data, token):
        s = data.draw(st.sampled_from(sorted(self.tokens)), "seq")
        n, table = len(self.tokens[s]), self.m.block_table(s)
        partial = n % self.bs != 0
        shared = partial and self.m.block_manager.ref_count(table[-1]) > 1
        k, v = self.kvf(self.tokens[s] + [token])
        if int(not partial) + int(shared) > self.m.block_manager.num_free_blocks:
            self._refused(OutOfBlocksError, self.m.append_token, s, k=k[:, n], v=v[:, n])
            return
        if partial:
            assert self.m.block_manager.block_hash(table[-1]) is None   # a partial block is never named
        self.m.append_token(s, k=k[:, n], v=v[:, n])
        self.copies += shared
        self.tokens[s].append(token)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        s = data.draw(st.sampled_from(sorted(self.tokens)), "seq")
        c = self.m.fork_sequence(s)
        self.tokens[c] = list(self.tokens[s])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        s = data.draw(st.sampled_from(sorted(self.tokens)), "seq")
        self.m.free_sequence(s)
        del self.tokens[s]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def register(self, data):
        """Name the first blocks of a sequence (its decode blocks too, as they fill)."""
        s = data.draw(st.sampled_from(sorted(self.tokens)), "seq")
        hashes = self._hashes(self.tokens[s])
        hashes = hashes[: data.draw(st.integers(0, len(hashes)), "count")]
        snap = self.m.block_manager.snapshot()
        owned = set(h for h in snap.block_hashes if h is not None)
        table = self.m.block_table(s)
        expected = sum(1 for b, h in zip(table, hashes) if snap.block_hashes[b] is None and h not in owned)
        assert self.m.register_blocks(s, hashes) == expected
        for b, h in zip(table, hashes):
            assert self.m.block_manager.block_hash(b) in (h, None)
        if hashes:
            too_many = self._hashes(self.tokens[s] + [0] * self.bs)
            self._refused(ValueError, self.m.register_blocks, s, too_many[: len(table) + 1])

    @rule(bad=st.sampled_from([-1, 10_000, True, 0.0]),
          call=st.sampled_from(["append_token", "fork_sequence", "free_sequence", "register_blocks"]))
    def bad_ids(self, bad, call):
        args = (bad, []) if call == "register_blocks" else (bad,)
        self._refused(ValueError, getattr(self.m, call), *args)

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def every_sequence_reads_the_kv_of_its_tokens(self):
        for s, tokens in self.tokens.items():
            assert self.m.context_len(s) == len(tokens)
            k, v = self.kvf(tokens)
            if not reads_exactly(self.m, self.m.block_table(s), len(tokens), k, v):
                assert_reads(self.m, s, k, v)  # fails, with the arrays in the message

    @invariant()
    def every_named_block_holds_its_tokens(self):
        """The stale-hash guard: what a lookup can return is exactly the K/V its hash names."""
        snap, bs = self.m.block_manager.snapshot(), self.bs
        for b, h in enumerate(snap.block_hashes):
            if h is None:
                continue
            k, v = self.kvf(self.named[h])
            assert reads_exactly(self.m, [b], bs, k[:, -bs:], v[:, -bs:]), f"block {b} does not hold its tokens"

    @invariant()
    def allocator_agrees_with_the_tables(self):
        bm = self.m.block_manager
        bm.check_invariants()
        snap = bm.snapshot()
        holders = {}
        for s, tokens in self.tokens.items():
            for i, b in enumerate(self.m.block_table(s)):
                holders[b] = holders.get(b, 0) + 1
                if snap.block_hashes[b] is not None:
                    assert i < len(tokens) // self.bs     # named blocks are full
        assert list(snap.ref_counts) == [holders.get(b, 0) for b in range(bm.num_blocks)]
        u = self.m.usage()
        assert (u.num_used_blocks, u.num_free_blocks) == (len(holders), bm.num_blocks - len(holders))
        assert u.num_cow_copies == self.copies

    def teardown(self):
        """Idle pool: after freeing everything, each block is free or evictable and the cache still serves."""
        if not hasattr(self, "m"):
            return
        for s in list(self.tokens):
            self.m.free_sequence(s)
        bm = self.m.block_manager
        bm.check_invariants()
        assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks
        snap = bm.snapshot()
        assert sorted(snap.free_ids + snap.evictable_ids) == list(range(bm.num_blocks))
        self.tokens = {}
        self.every_named_block_holds_its_tokens()


TestCachingManagerMachine = CachingManagerMachine.TestCase
# NOTE: each step checks every sequence and every named block; half the profile's examples keep CI at ~7 s
TestCachingManagerMachine.settings = settings(settings.default,
                                              max_examples=max(10, settings.default.max_examples // 2))
