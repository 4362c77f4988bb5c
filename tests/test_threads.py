"""Eight threads doing random add / append / fork / free on one manager for a bounded time: afterwards every
invariant holds, every sequence reads back exactly what it wrote, and freeing all leaves every block free."""
import hashlib
import sys
import threading
import time

import numpy as np
import pytest

from pagedkv import OutOfBlocksError, PagedAttentionManager
from pagedkv.cache.block_hash import BlockHasher

NUM_THREADS = 8
DURATION_S = 3.0
NUM_BLOCKS, BLOCK_SIZE, NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 48, 4, 1, 1, 4


@pytest.fixture
def fast_switching():
    """Switch threads every 10 us instead of 5 ms, so that calls interleave far more often."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def token(rng):
    k, v = rng.standard_normal((2, NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    return k, v


def worker(m, seed, deadline, rows, stats, errors):
    """Random operations on this thread's own sequences (forks included); ``rows[s]`` is what s wrote."""
    rng = np.random.default_rng(seed)
    try:
        while time.monotonic() < deadline:
            op = rng.choice(["add", "append", "append", "append", "fork", "free"]) if rows else "add"
            try:
                if op == "add":
                    n = int(rng.integers(1, 9))
                    toks = [token(rng) for _ in range(n)]
                    k = np.stack([t[0] for t in toks], axis=1)
                    v = np.stack([t[1] for t in toks], axis=1)
                    rows[m.add_sequence(n, k=k, v=v)] = toks
                else:
                    s = list(rows)[int(rng.integers(len(rows)))]
                    if op == "append":
                        k, v = token(rng)
                        m.append_token(s, k=k, v=v)
                        rows[s].append((k, v))
                    elif op == "fork":
                        rows[m.fork_sequence(s)] = list(rows[s])
                    else:
                        m.free_sequence(s)
                        del rows[s]
                stats[op] += 1
            except OutOfBlocksError:
                stats["out_of_blocks"] += 1
                if rows:  # make room
                    s = list(rows)[int(rng.integers(len(rows)))]
                    m.free_sequence(s)
                    del rows[s]
    except BaseException as exc:  # noqa: BLE001 - reported by the main thread
        errors.append(exc)


def watcher(m, deadline, stats, errors):
    """Concurrent readers: the allocator's invariants and usage must hold at every instant."""
    try:
        while time.monotonic() < deadline:
            m.block_manager.check_invariants()
            u = m.usage()
            assert u.num_used_blocks + u.num_free_blocks == NUM_BLOCKS
            assert u.num_token_slots_used <= u.num_token_slots_reserved == u.num_used_blocks * BLOCK_SIZE
            free, counts = m.block_manager.snapshot()[:2]
            assert len(free) == len(set(free)) == sum(1 for c in counts if c == 0)
            stats["checks"] += 1
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)


def assert_reads(m, s, toks):
    table, n = m.block_table(s), m.context_len(s)
    assert n == len(toks)
    k, v = m.kv_cache.gather(0, table, n)
    np.testing.assert_array_equal(k, np.stack([t[0][0] for t in toks]))
    np.testing.assert_array_equal(v, np.stack([t[1][0] for t in toks]))


def test_eight_threads_keep_every_invariant(fast_switching):
    m = PagedAttentionManager.create(NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, "float32", "cpu")
    m.kv_cache.k_pool[...] = np.nan
    m.kv_cache.v_pool[...] = np.nan
    deadline = time.monotonic() + DURATION_S
    rows = [{} for _ in range(NUM_THREADS)]
    stats = [dict.fromkeys(["add", "append", "fork", "free", "out_of_blocks"], 0) for _ in range(NUM_THREADS)]
    watch_stats, errors = {"checks": 0}, []
    threads = [threading.Thread(target=worker, args=(m, 1000 + i, deadline, rows[i], stats[i], errors))
               for i in range(NUM_THREADS)]
    threads.append(threading.Thread(target=watcher, args=(m, deadline, watch_stats, errors)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DURATION_S + 30)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock?)"
    if errors:
        raise errors[0]

    # the run did real, contended work
    total = {key: sum(s[key] for s in stats) for key in stats[0]}
    assert all(sum(s.values()) > 20 for s in stats), stats
    assert total["fork"] > 0 and total["append"] > 0 and total["free"] > 0 and watch_stats["checks"] > 0, total
    assert m.usage().num_cow_copies > 0

    # every invariant holds, and every live sequence reads exactly what it wrote
    m.block_manager.check_invariants()
    live = {s: toks for r in rows for s, toks in r.items()}
    assert sorted(m.seq_ids) == sorted(live)
    holders = {}
    for s, toks in live.items():
        assert_reads(m, s, toks)
        for b in m.block_table(s):
            holders[b] = holders.get(b, 0) + 1
    _, counts = m.block_manager.snapshot()[:2]
    assert list(counts) == [holders.get(b, 0) for b in range(NUM_BLOCKS)]
    assert m.usage().num_logical_tokens == sum(map(len, live.values()))

    # freed from many threads at once: nothing leaked, nothing double-freed
    def free_all(ids):
        try:
            for s in ids:
                m.free_sequence(s)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    freers = [threading.Thread(target=free_all, args=(list(r),)) for r in rows]
    for t in freers:
        t.start()
    for t in freers:
        t.join(timeout=30)
    if errors:
        raise errors[0]
    free, counts = m.block_manager.snapshot()[:2]
    assert m.block_manager.num_free_blocks == NUM_BLOCKS and m.block_manager.num_used_blocks == 0
    assert sorted(free) == list(range(NUM_BLOCKS))
    assert counts == (0,) * NUM_BLOCKS
    assert m.seq_ids == [] and m.usage().num_sequences == 0
    m.block_manager.check_invariants()


# -- the same with prefix caching: shared documents, cache hits, evictions --------------------------------
DOCS = [[7, 7, 1, 2, 3, 4, 5, 6, 9, 9], [7, 7, 1, 2, 8, 8, 8, 8], [3] * 12]   # overlapping prompts


def prefix_row(prefix: tuple, cache: dict):
    """K and V of the last token of ``prefix``, a function of the whole prefix (as a model's would be)."""
    if prefix not in cache:
        seed = int.from_bytes(hashlib.sha256(np.array(prefix, "<i8").tobytes()).digest()[:8], "little")
        cache[prefix] = tuple(np.random.default_rng(seed).standard_normal((2, NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM))
                              .astype(np.float32))
    return cache[prefix]


def prefix_kv(tokens, cache):
    rows = [prefix_row(tuple(tokens[: t + 1]), cache) for t in range(len(tokens))]
    return tuple(np.stack([r[i] for r in rows], axis=1) for i in (0, 1))


def caching_worker(m, hasher, seed, deadline, seqs, named, rows, stats, errors):
    """Random add-on-a-prefix / append / fork / free / register on this thread's own sequences."""
    rng = np.random.default_rng(seed)

    def hashes_of(tokens):
        hashes = hasher.hash_full_blocks(tokens, BLOCK_SIZE)
        for i, h in enumerate(hashes):
            named[h] = tuple(tokens[: (i + 1) * BLOCK_SIZE])
        return hashes

    try:
        while time.monotonic() < deadline:
            op = rng.choice(["add", "append", "append", "fork", "free", "register"]) if seqs else "add"
            try:
                if op == "add":
                    doc = DOCS[int(rng.integers(len(DOCS)))]
                    head = doc[: int(rng.integers(0, len(doc) + 1))] if rng.random() < 0.7 else []
                    tokens = head + rng.integers(0, 3, int(rng.integers(0 if head else 1, 5))).tolist()
                    hashes, (k, v) = hashes_of(tokens), prefix_kv(tokens, rows)
                    with m.lock:  # no allocation between the lookup and the add
                        ids = m.lookup(hashes, len(tokens))
                        nc = len(ids) * BLOCK_SIZE
                        s = m.add_sequence(len(tokens), k=k[:, nc:], v=v[:, nc:], cached_block_ids=ids)
                    seqs[s] = tokens
                    stats["hit"] += bool(ids)
                    if rng.random() < 0.8:
                        m.register_blocks(s, hashes)
                else:
                    s = list(seqs)[int(rng.integers(len(seqs)))]
                    if op == "append":
                        tokens = seqs[s] + [int(rng.integers(0, 3))]
                        k, v = prefix_row(tuple(tokens), rows)
                        m.append_token(s, k=k, v=v)
                        seqs[s] = tokens
                    elif op == "fork":
                        seqs[m.fork_sequence(s)] = list(seqs[s])
                    elif op == "register":
                        m.register_blocks(s, hashes_of(seqs[s]))
                    else:
                        m.free_sequence(s)
                        del seqs[s]
                stats[op] += 1
            except OutOfBlocksError:
                stats["out_of_blocks"] += 1
                if seqs:
                    s = list(seqs)[int(rng.integers(len(seqs)))]
                    m.free_sequence(s)
                    del seqs[s]
    except BaseException as exc:  # noqa: BLE001 - reported by the main thread
        errors.append(exc)


def caching_watcher(m, deadline, stats, errors):
    try:
        while time.monotonic() < deadline:
            bm = m.block_manager
            bm.check_invariants()
            snap = bm.snapshot()
            assert len(snap.free_ids) + len(snap.evictable_ids) + sum(c > 0 for c in snap.ref_counts) == NUM_BLOCKS
            assert all(snap.block_hashes[b] is not None for b in snap.evictable_ids)
            u = m.usage()
            assert u.num_used_blocks + u.num_free_blocks == NUM_BLOCKS
            stats["checks"] += 1
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)


def assert_named_blocks_hold_their_tokens(m, named, rows):
    for b, h in enumerate(m.block_manager.snapshot().block_hashes):
        if h is not None:
            k, v = prefix_kv(list(named[h]), rows)
            gk, gv = m.kv_cache.gather(0, [b], BLOCK_SIZE)
            np.testing.assert_array_equal(gk, k[0, -BLOCK_SIZE:])
            np.testing.assert_array_equal(gv, v[0, -BLOCK_SIZE:])


def test_eight_threads_with_prefix_caching(fast_switching):
    m = PagedAttentionManager.create(NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, "float32", "cpu",
                                     enable_prefix_caching=True)
    m.kv_cache.k_pool[...] = np.nan
    m.kv_cache.v_pool[...] = np.nan
    hasher = BlockHasher.for_model("threads", "float32", BLOCK_SIZE)
    deadline = time.monotonic() + DURATION_S
    seqs, named, rows = [{} for _ in range(NUM_THREADS)], {}, {}
    keys = ["add", "append", "fork", "free", "register", "hit", "out_of_blocks"]
    stats = [dict.fromkeys(keys, 0) for _ in range(NUM_THREADS)]
    watch_stats, errors = {"checks": 0}, []
    threads = [threading.Thread(target=caching_worker,
                                args=(m, hasher, 2000 + i, deadline, seqs[i], named, rows, stats[i], errors))
               for i in range(NUM_THREADS)]
    threads.append(threading.Thread(target=caching_watcher, args=(m, deadline, watch_stats, errors)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DURATION_S + 30)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock?)"
    if errors:
        raise errors[0]

    total = {key: sum(s[key] for s in stats) for key in keys}
    assert all(total[key] > 0 for key in keys) and watch_stats["checks"] > 0, total
    assert m.block_manager.num_evictions > 0 and m.usage().num_cow_copies > 0, total

    m.block_manager.check_invariants()
    live = {s: toks for r in seqs for s, toks in r.items()}
    assert sorted(m.seq_ids) == sorted(live)
    for s, toks in live.items():
        k, v = prefix_kv(toks, rows)
        gk, gv = m.kv_cache.gather(0, m.block_table(s), len(toks))
        np.testing.assert_array_equal(gk, k[0])
        np.testing.assert_array_equal(gv, v[0])
    assert_named_blocks_hold_their_tokens(m, named, rows)

    freers = [threading.Thread(target=lambda ids=list(r): [m.free_sequence(s) for s in ids]) for r in seqs]
    for t in freers:
        t.start()
    for t in freers:
        t.join(timeout=30)
    # idle: every block is free or evictable, nothing leaked, the cache still holds what its hashes name
    bm = m.block_manager
    snap = bm.snapshot()
    assert m.seq_ids == [] and bm.num_used_blocks == 0 and bm.num_free_blocks == NUM_BLOCKS
    assert sorted(snap.free_ids + snap.evictable_ids) == list(range(NUM_BLOCKS))
    assert snap.ref_counts == (0,) * NUM_BLOCKS and bm.num_evictable_blocks == bm.num_cached_blocks > 0
    bm.check_invariants()
    assert_named_blocks_hold_their_tokens(m, named, rows)
