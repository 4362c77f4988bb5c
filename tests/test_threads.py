"""Eight threads doing random add / append / fork / free on one manager for a bounded time: afterwards every
invariant holds, every sequence reads back exactly what it wrote, and freeing all leaves every block free."""
import sys
import threading
import time

import numpy as np
import pytest

from pagedkv import OutOfBlocksError, PagedAttentionManager

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
