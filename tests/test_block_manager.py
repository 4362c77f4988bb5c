"""BlockManager: step by step (free list drawn in comments, as vLLM's queue tests do), errors that change
nothing, and a Hypothesis state machine against a plain-dict model with the three invariants."""
import hashlib
import re

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagedkv.cache.block_manager import BlockManager, InvariantError, OutOfBlocksError


def free_list(bm):
    return list(bm.snapshot()[0])


def refs(bm):
    return list(bm.snapshot()[1])


def names(msg: str, value) -> bool:
    """``value`` appears in ``msg`` as a whole number (so 1 is not found inside 12 or -1)."""
    return re.search(rf"(?<![\d-]){re.escape(str(value))}(?!\d)", msg) is not None


def assert_error_changes_nothing(bm, exc_type, fn, *args, value):
    before = bm.snapshot()
    with pytest.raises(exc_type) as info:
        fn(*args)
    assert names(str(info.value), value), f"message {str(info.value)!r} does not name {value!r}"
    assert bm.snapshot() == before
    bm.check_invariants()


# -- step by step ---------------------------------------------------------------------------------
def test_fresh_pool_is_all_free_in_id_order():
    bm = BlockManager(4, 16)
    # free: [0 1 2 3]
    assert free_list(bm) == [0, 1, 2, 3]
    assert refs(bm) == [0, 0, 0, 0]
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.num_blocks, bm.block_size) == (4, 0, 4, 16)
    bm.check_invariants()


def test_allocate_share_free_step_by_step():
    bm = BlockManager(6, 8)
    # free: [0 1 2 3 4 5]
    assert bm.allocate(2) == [0, 1]
    # free: [2 3 4 5]          used: 0(1) 1(1)
    assert free_list(bm) == [2, 3, 4, 5]
    assert refs(bm) == [1, 1, 0, 0, 0, 0]
    assert (bm.num_free_blocks, bm.num_used_blocks) == (4, 2)

    assert bm.allocate(3) == [2, 3, 4]
    # free: [5]                used: 0(1) 1(1) 2(1) 3(1) 4(1)
    assert free_list(bm) == [5]

    bm.free([1])
    # free: [5 1]              used: 0(1) 2(1) 3(1) 4(1)
    assert free_list(bm) == [5, 1]
    assert bm.ref_count(1) == 0

    bm.share([3, 3, 0])
    # free: [5 1]              used: 0(2) 2(1) 3(3) 4(1)
    assert refs(bm) == [2, 0, 1, 3, 1, 0]
    assert free_list(bm) == [5, 1]

    bm.free([3])
    # free: [5 1]              used: 0(2) 2(1) 3(2) 4(1)    (3 still referenced: stays used)
    assert bm.ref_count(3) == 2 and free_list(bm) == [5, 1]

    bm.free([4, 0, 2])
    # free: [5 1 4 2]          used: 0(1) 3(2)               (0 dropped to 1: not freed)
    assert free_list(bm) == [5, 1, 4, 2]
    assert refs(bm) == [1, 0, 0, 2, 0, 0]

    bm.free([3, 0, 3])
    # free: [5 1 4 2 0 3]      (0 reaches zero before 3's second drop: that is the join order)
    assert free_list(bm) == [5, 1, 4, 2, 0, 3]
    assert refs(bm) == [0] * 6
    assert (bm.num_free_blocks, bm.num_used_blocks) == (6, 0)
    bm.check_invariants()


def test_docstring_reuse_order_is_fifo():
    bm = BlockManager(6, 4)
    bm.allocate(3)
    # free: [3 4 5]
    assert free_list(bm) == [3, 4, 5]
    assert bm.allocate(2) == [3, 4]
    # free: [5]
    bm.free([4])
    # free: [5 4]
    assert free_list(bm) == [5, 4]
    assert bm.allocate(1) == [5]
    # free: [4]
    assert bm.allocate(1) == [4]
    # free: []


def test_least_recently_freed_block_is_reused_first():
    bm = BlockManager(5, 4)
    ids = bm.allocate(5)
    # free: []
    for b in (2, 0, 4, 1, 3):
        bm.free([b])
    # free: [2 0 4 1 3]
    assert [bm.allocate(1)[0] for _ in range(5)] == [2, 0, 4, 1, 3]
    assert sorted(ids) == list(range(5))


def test_allocate_zero_takes_nothing():
    bm = BlockManager(3, 4)
    before = bm.snapshot()
    assert bm.allocate(0) == []
    assert bm.snapshot() == before


def test_allocate_whole_pool_then_exhaustion():
    bm = BlockManager(3, 4)
    assert bm.allocate(3) == [0, 1, 2]
    # free: []
    assert not bm.can_allocate(1) and bm.can_allocate(0)
    assert_error_changes_nothing(bm, OutOfBlocksError, bm.allocate, 1, value=1)


def test_numpy_integer_ids_are_accepted():
    bm = BlockManager(4, 4)
    ids = np.array(bm.allocate(3), dtype=np.int32)
    bm.share(ids[:1])
    bm.free(ids)
    # free: [3 1 2]   (0 still has one reference)
    assert free_list(bm) == [3, 1, 2]
    assert bm.ref_count(np.int64(0)) == 1


def test_can_allocate():
    bm = BlockManager(4, 4)
    bm.allocate(1)
    assert [bm.can_allocate(n) for n in (-1, 0, 3, 4)] == [False, True, True, False]


# -- errors change nothing ------------------------------------------------------------------------
@pytest.mark.parametrize("num_blocks, block_size, bad", [
    (0, 16, 0), (-2, 16, -2), (4, 0, 0), (4, -1, -1), (4, True, True), (2.0, 4, 2.0), (4, "16", "'16'"),
])
def test_constructor_rejects_bad_sizes(num_blocks, block_size, bad):
    with pytest.raises(ValueError) as info:
        BlockManager(num_blocks, block_size)
    assert str(bad) in str(info.value)


def _pool_in_use():
    """Six blocks: 0(1) 1(2) 2(1) used, free: [3 4 5]."""
    bm = BlockManager(6, 4)
    bm.allocate(3)
    bm.share([1])
    return bm


def test_out_of_blocks_names_requested_and_free_counts():
    bm = _pool_in_use()
    before = bm.snapshot()
    with pytest.raises(OutOfBlocksError) as info:
        bm.allocate(4)
    assert isinstance(info.value, ValueError)
    assert names(str(info.value), 4) and names(str(info.value), 3)  # requested 4, 3 free
    assert bm.snapshot() == before


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2", None])
def test_allocate_bad_count(bad):
    bm = _pool_in_use()
    assert_error_changes_nothing(bm, ValueError, bm.allocate, bad, value=repr(bad))


@pytest.mark.parametrize("ids, bad", [
    ([99], 99),            # outside [0, 6)
    ([-1], -1),
    ([6], 6),
    ([4], 4),              # free
    ([0, 2, 1, 5], 5),     # one free id among good ones: nothing is dropped, not even 0 and 2
    ([0, 1, 2, 17], 17),   # one unknown id last
    ([17, 0, 1, 2], 17),   # ... or first
    ([0, 0], 0),           # two drops, one reference
    ([1, 2, 1, 1], 1),     # three drops, two references
    ([True], True),
    (["a"], "'a'"),
    ([1.0], 1.0),
])
def test_bad_free_changes_nothing(ids, bad):
    bm = _pool_in_use()
    # free: [3 4 5]    used: 0(1) 1(2) 2(1)
    assert_error_changes_nothing(bm, ValueError, bm.free, ids, value=bad)
    assert free_list(bm) == [3, 4, 5] and refs(bm) == [1, 2, 1, 0, 0, 0]


def test_double_free_is_refused():
    bm = BlockManager(2, 4)
    bm.allocate(1)
    bm.free([0])
    # free: [1 0]
    assert_error_changes_nothing(bm, ValueError, bm.free, [0], value=0)
    assert free_list(bm) == [1, 0]


@pytest.mark.parametrize("ids, bad", [([3], 3), ([0, 4], 4), ([0, 99], 99), ([-1], -1)])
def test_bad_share_changes_nothing(ids, bad):
    bm = _pool_in_use()
    assert_error_changes_nothing(bm, ValueError, bm.share, ids, value=bad)


@pytest.mark.parametrize("bad", [6, -1, 100])
def test_ref_count_of_unknown_id(bad):
    bm = _pool_in_use()
    assert_error_changes_nothing(bm, ValueError, bm.ref_count, bad, value=bad)


def test_check_invariants_catches_corruption():
    """The invariant checker itself can fail (so the state machine's calls to it mean something)."""
    bm = _pool_in_use()
    bm._free.append(3)  # 3 twice in the free list
    with pytest.raises(InvariantError):
        bm.check_invariants()
    bm = _pool_in_use()
    bm._ref_counts[0] = 0  # a used block with no reference
    with pytest.raises(InvariantError):
        bm.check_invariants()


# -- the state machine ----------------------------------------------------------------------------
class BlockManagerMachine(RuleBasedStateMachine):
    """BlockManager against a model: a FIFO list of free ids and a dict ``block id -> ref count``.

    ``held`` is the multiset of references the "callers" own (one entry per allocate or share); good
    frees drop a sub-multiset of it, bad frees mix one bad id into good ones.
    """

    @initialize(num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 4, 16]))
    def setup(self, num_blocks, block_size):
        self.bm = BlockManager(num_blocks, block_size)
        self.num_blocks = num_blocks
        self.model_free = list(range(num_blocks))
        self.model_refs: dict[int, int] = {}
        self.held: list[int] = []

    # -- good operations ---------------------------------------------------------------------------
    @rule(n=st.integers(0, 14))
    def allocate(self, n):
        if n > len(self.model_free):
            before = self.bm.snapshot()
            with pytest.raises(OutOfBlocksError) as info:
                self.bm.allocate(n)
            assert names(str(info.value), n) and names(str(info.value), len(self.model_free))
            assert self.bm.snapshot() == before
            return
        got = self.bm.allocate(n)
        expected, self.model_free = self.model_free[:n], self.model_free[n:]
        assert got == expected  # FIFO: from the front
        for b in got:
            self.model_refs[b] = 1
        self.held += got

    @rule()
    def exhaust(self):
        """Take every free block, then one more must fail."""
        self.allocate(len(self.model_free))
        self.allocate(1)

    @precondition(lambda self: self.model_refs)
    @rule(data=st.data())
    def share(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.model_refs)), min_size=1, max_size=4), "ids")
        self.bm.share(ids)
        for b in ids:
            self.model_refs[b] += 1
        self.held += ids

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free(self, data):
        idx = data.draw(st.lists(st.integers(0, len(self.held) - 1), min_size=1, max_size=5, unique=True), "idx")
        ids = [self.held[i] for i in idx]
        for i in sorted(idx, reverse=True):
            del self.held[i]
        self.bm.free(ids)
        for b in ids:  # the model drops in list order: a block joins the back when it reaches zero
            self.model_refs[b] -= 1
            if self.model_refs[b] == 0:
                del self.model_refs[b]
                self.model_free.append(b)

    # -- bad operations ----------------------------------------------------------------------------
    def _bad_id(self, data):
        kinds = ["out_of_range_high", "out_of_range_low"]
        if self.model_free:
            kinds.append("free")
        if self.model_refs:
            kinds.append("over_drop")
        kind = data.draw(st.sampled_from(kinds), "kind")
        if kind == "out_of_range_high":
            return [data.draw(st.integers(self.num_blocks, self.num_blocks + 50), "bad")]
        if kind == "out_of_range_low":
            return [data.draw(st.integers(-50, -1), "bad")]
        if kind == "free":
            return [data.draw(st.sampled_from(self.model_free), "bad")]
        b = data.draw(st.sampled_from(sorted(self.model_refs)), "bad")
        return [b] * (self.model_refs[b] + 1)  # one drop more than it has references

    @rule(data=st.data())
    def bad_free(self, data):
        """A list with one bad id (or one over-dropped block) among good ones: nothing changes."""
        bad = self._bad_id(data)
        good = data.draw(st.lists(st.sampled_from(self.held), max_size=3, unique=True), "good") if self.held else []
        good = [b for b in good if b != bad[0]]
        ids = data.draw(st.permutations(good + bad), "ids")
        before = self.bm.snapshot()
        with pytest.raises(ValueError) as info:
            self.bm.free(ids)
        assert not isinstance(info.value, OutOfBlocksError)
        assert names(str(info.value), bad[0]), (str(info.value), bad)
        assert self.bm.snapshot() == before

    @rule(data=st.data())
    def bad_share(self, data):
        bad = self._bad_id(data)[:1]
        if 0 <= bad[0] < self.num_blocks and bad[0] in self.model_refs:
            return  # a used block: sharing it is fine, not a bad input
        good = data.draw(st.lists(st.sampled_from(sorted(self.model_refs)), max_size=3), "good") \
            if self.model_refs else []
        before = self.bm.snapshot()
        with pytest.raises(ValueError) as info:
            self.bm.share(data.draw(st.permutations(good + bad), "ids"))
        assert names(str(info.value), bad[0])
        assert self.bm.snapshot() == before

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def free_plus_used_is_total(self):
        free, counts = self.bm.snapshot()[:2]
        assert self.bm.num_free_blocks + self.bm.num_used_blocks == self.num_blocks
        assert len(free) + sum(1 for c in counts if c > 0) == self.num_blocks

    @invariant()
    def used_blocks_have_references(self):
        free, counts = self.bm.snapshot()[:2]
        free_set = set(free)
        assert all(counts[b] >= 1 for b in range(self.num_blocks) if b not in free_set)
        assert all(counts[b] == 0 for b in free_set)

    @invariant()
    def no_id_twice_in_free_list(self):
        free = self.bm.snapshot()[0]
        assert len(set(free)) == len(free)
        assert all(0 <= b < self.num_blocks for b in free)

    @invariant()
    def matches_model(self):
        free, counts = self.bm.snapshot()[:2]
        assert list(free) == self.model_free
        assert list(counts) == [self.model_refs.get(b, 0) for b in range(self.num_blocks)]
        assert sorted(self.held) == sorted(b for b, c in self.model_refs.items() for _ in range(c))
        self.bm.check_invariants()


TestBlockManagerMachine = BlockManagerMachine.TestCase


# -- issue 8, finding 8: check_invariants checks under python -O ---------------------------------------
def test_check_invariants_raises_under_python_O():
    """Asserts vanish under ``python -O``; the checker must raise a real exception there too."""
    import subprocess
    import sys
    code = ("from pagedkv.cache.block_manager import BlockManager\n"
            "bm = BlockManager(4, 4); bm.allocate(2); bm._ref_counts[0] = 0\n"
            "try:\n    bm.check_invariants()\nexcept Exception as e:\n    print('raised', type(e).__name__)\n"
            "else:\n    print('nothing')\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "raised InvariantError", out.stdout + out.stderr


# == prefix caching: step by step (free list and LRU drawn in comments) ==================================
def H(text) -> bytes:
    """A block hash for tests: any distinct bytes will do."""
    return hashlib.sha256(str(text).encode()).digest()


def lru(bm):
    return list(bm.snapshot().evictable_ids)


def caching_pool(num_blocks=6):
    return BlockManager(num_blocks, 4, enable_prefix_caching=True)


def test_caching_is_off_by_default_and_changes_nothing_then():
    bm = BlockManager(4, 4)
    assert not bm.enable_prefix_caching
    ids = bm.allocate(2)
    assert_error_changes_nothing(bm, ValueError, bm.register, ids[0], H(0), value="disabled")
    assert bm.lookup([H(0)]) == [] and bm.block_hash(0) is None
    bm.free(ids)
    # free: [2 3 0 1]    lru: []      (without caching nothing is ever evictable)
    assert free_list(bm) == [2, 3, 0, 1] and lru(bm) == []
    s = bm.snapshot()
    assert s.block_hashes == (None,) * 4 and s.num_evictions == 0
    assert (bm.num_evictable_blocks, bm.num_cached_blocks, bm.num_evictions) == (0, 0, 0)


def test_docstring_cache_reuse_order():
    bm = caching_pool(6)
    assert bm.allocate(6) == [0, 1, 2, 3, 4, 5]
    for b, name in ((2, "a"), (0, "b"), (3, "c")):
        assert bm.register(b, H(name)) is True
    bm.free([2, 0, 3])
    bm.free([4, 5])
    # free: [4 5]   lru: [2 0 3]   used: 1(1)          hashes: 2=a 0=b 3=c
    assert free_list(bm) == [4, 5] and lru(bm) == [2, 0, 3]
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.num_evictable_blocks, bm.num_cached_blocks) == (5, 1, 3, 3)
    bm.check_invariants()

    assert bm.allocate(3) == [4, 5, 2]
    # free: []      lru: [0 3]     2 evicted: its hash is gone at once
    assert free_list(bm) == [] and lru(bm) == [0, 3]
    assert bm.block_hash(2) is None and bm.lookup([H("a")]) == [] and bm.num_evictions == 1
    assert bm.ref_count(2) == 1

    bm.acquire([3])
    # lru: [0]      3 used again (a cache hit), hash kept
    assert lru(bm) == [0] and bm.ref_count(3) == 1 and bm.block_hash(3) == H("c")
    bm.free([3, 4])
    # free: [4]     lru: [0 3]     3 is hashed -> LRU tail; 4 has no hash -> free list
    assert free_list(bm) == [4] and lru(bm) == [0, 3]
    assert bm.num_free_blocks == 3
    bm.check_invariants()


def test_allocate_takes_free_blocks_before_evicting_and_evicts_lru_first():
    bm = caching_pool(4)
    bm.allocate(4)
    for b in (0, 1, 2):
        bm.register(b, H(b))
    bm.free([1, 3, 0, 2])
    # free: [3]     lru: [1 0 2]
    assert free_list(bm) == [3] and lru(bm) == [1, 0, 2]
    assert bm.allocate(1) == [3]                  # a truly free block first: nothing evicted
    assert bm.num_evictions == 0 and bm.lookup([H(0)]) == [0]
    assert bm.allocate(2) == [1, 0]               # then the least recently released
    # free: []      lru: [2]
    assert bm.num_evictions == 2 and lru(bm) == [2]
    assert bm.lookup([H(1)]) == [] and bm.lookup([H(0)]) == [] and bm.lookup([H(2)]) == [2]
    assert_error_changes_nothing(bm, OutOfBlocksError, bm.allocate, 2, value=2)  # 1 free (evictable)
    bm.check_invariants()


def test_lookup_is_the_longest_prefix_and_changes_nothing():
    bm = caching_pool(6)
    bm.allocate(4)
    for b, name in ((3, "h0"), (1, "h1"), (0, "h3")):
        bm.register(b, H(name))
    bm.free([1])
    # used: 0 2 3      lru: [1]       hashes: 3=h0 1=h1 0=h3 (h2 not cached)
    before = bm.snapshot()
    assert bm.lookup([H("h0"), H("h1"), H("h2"), H("h3")]) == [3, 1]   # stops at the first miss
    assert bm.lookup([H("h2"), H("h0")]) == [] and bm.lookup([]) == []
    assert bm.lookup(iter([H("h0")])) == [3]
    assert bm.snapshot() == before                                   # a pure query: LRU untouched


def test_acquire_and_share_step_by_step():
    bm = caching_pool(4)
    bm.allocate(3)
    bm.register(0, H(0))
    bm.register(1, H(1))
    bm.free([0, 1, 2])
    # free: [3 2]   lru: [0 1]
    bm.acquire([1, 1, 0])
    # lru: []       1(2) 0(1)      an id may come twice: two references, out of the LRU once
    assert lru(bm) == [] and bm.ref_count(1) == 2 and bm.ref_count(0) == 1
    bm.acquire([1])                 # a used cached block can be acquired again
    bm.share([0])                   # and shared (a fork)
    assert bm.ref_count(1) == 3 and bm.ref_count(0) == 2
    bm.free([1, 0, 1, 0, 1])
    # lru: [0 1]    (0 reached zero before 1's last drop)
    assert lru(bm) == [0, 1] and free_list(bm) == [3, 2]
    bm.check_invariants()


@pytest.mark.parametrize("ids, bad", [
    ([3], 3),                 # free: holds nothing
    ([2], 2),                 # used, but never registered
    ([0, 3], 3),              # all-or-nothing: 0 (evictable) stays in the LRU
    ([0, 9], 9), ([-1], -1), ([True], True), (["0"], "'0'"),
])
def test_bad_acquire_changes_nothing(ids, bad):
    bm = caching_pool(4)
    bm.allocate(3)
    bm.register(0, H(0))
    bm.register(1, H(1))
    bm.free([0])
    # free: [3]     lru: [0]      used: 1 (hashed) 2 (not)
    assert_error_changes_nothing(bm, ValueError, bm.acquire, ids, value=bad)
    assert lru(bm) == [0]


def test_share_and_free_refuse_an_evictable_block():
    bm = caching_pool(3)
    bm.allocate(1)
    bm.register(0, H(0))
    bm.free([0])
    # lru: [0]
    for fn in (bm.share, bm.free):
        assert_error_changes_nothing(bm, ValueError, fn, [0], value=0)
    with pytest.raises(ValueError, match="evictable"):
        bm.share([0])


def test_register_rules():
    bm = caching_pool(4)
    bm.allocate(3)
    assert bm.register(0, H("x")) is True
    assert bm.register(0, H("x")) is True                # again, same content: nothing changes
    before = bm.snapshot()
    assert bm.register(1, H("x")) is False               # the same content computed twice: 1 stays unnamed
    assert bm.snapshot() == before and bm.block_hash(1) is None
    assert_error_changes_nothing(bm, ValueError, bm.register, 0, H("y"), value=0)   # content never changes
    assert_error_changes_nothing(bm, ValueError, bm.register, 3, H("y"), value=3)   # free
    for bad in ("abc", 7, b"", bytearray(b"ab"), None):
        assert_error_changes_nothing(bm, ValueError, bm.register, 1, bad, value=repr(bad)[:20])
    for bad in (True, 4, -1, 1.0):
        assert_error_changes_nothing(bm, ValueError, bm.register, bad, H("z"), value=bad)
    for bad in (H("x"), "ab", [H(1), 5], None):
        assert_error_changes_nothing(bm, ValueError, bm.lookup, bad, value="bytes")
    bm.free([1])
    # free: [3 1]  1 was never named, so it is truly free again
    assert free_list(bm) == [3, 1] and lru(bm) == []


def test_stale_hash_never_points_at_reused_memory():
    """Evicting a block drops its hash before the block holds anything else; re-registering names new content."""
    bm = caching_pool(2)
    bm.allocate(2)
    bm.register(0, H("old0"))
    bm.register(1, H("old1"))
    bm.free([1, 0])
    # lru: [1 0]
    (b,) = bm.allocate(1)
    assert b == 1 and bm.lookup([H("old1")]) == [] and bm.block_hash(1) is None
    bm.register(1, H("new"))
    assert bm.lookup([H("new")]) == [1] and bm.lookup([H("old1")]) == []
    assert bm.lookup([H("old0")]) == [0]                 # the other one is still cached
    bm.check_invariants()


def test_acquire_and_allocate_counts_the_evictable_cached_blocks():
    bm = caching_pool(3)
    bm.allocate(3)
    bm.register(0, H(0))
    bm.register(1, H(1))
    bm.free([0, 1, 2])
    # free: [2]     lru: [0 1]      num_free_blocks 3
    assert bm.count_evictable([0, 1, 0, 2]) == 2
    # [0, 1] + 2 fresh would take 4 of 3 (a naive acquire-then-allocate would fail half way)
    assert_error_changes_nothing(bm, OutOfBlocksError, bm.acquire_and_allocate, [0, 1], 2, value=4)
    assert_error_changes_nothing(bm, ValueError, bm.acquire_and_allocate, [0, 2], 0, value=2)
    assert_error_changes_nothing(bm, ValueError, bm.acquire_and_allocate, [0], -1, value=-1)
    assert bm.acquire_and_allocate([0], 2) == [0, 2, 1]   # fresh: 2 from the free list, then evict 1
    # free: []      lru: []
    assert bm.num_evictions == 1 and bm.lookup([H(0), H(1)]) == [0]
    bm.check_invariants()


@pytest.mark.parametrize("corrupt, what", [
    (lambda bm: bm._evictable.__setitem__(3, None), "twice"),                     # 3 free and evictable
    (lambda bm: bm._hashes.__setitem__(0, None), "no hash"),                      # evictable, no hash
    (lambda bm: bm._hashes.__setitem__(3, H(9)), "hash"),                         # free block with a hash
    (lambda bm: bm._hash_to_block.__setitem__(H(0), 1), "disagree"),              # map points elsewhere
    (lambda bm: bm._hash_to_block.pop(H(1)), "disagree"),                         # a recorded hash unmapped
    (lambda bm: bm._ref_counts.__setitem__(0, 1), "ref_count"),                   # evictable with a reference
    (lambda bm: bm._evictable.pop(0), "num_blocks"),                              # a block lost
])
def test_check_invariants_catches_cache_corruption(corrupt, what):
    bm = caching_pool(4)
    bm.allocate(3)
    bm.register(0, H(0))
    bm.register(1, H(1))
    bm.free([0])
    # free: [3]     lru: [0]      used: 1 (hashed) 2
    bm.check_invariants()
    corrupt(bm)
    with pytest.raises(InvariantError, match=what):
        bm.check_invariants()


# == prefix caching: the state machine ===================================================================
LABELS = range(4)                       # what a block can hold: few, so equal content happens often
LABEL_HASH = {x: H(f"label-{x}") for x in LABELS}
UNKNOWN = H("never-registered")


class CachingBlockManagerMachine(RuleBasedStateMachine):
    """BlockManager with prefix caching against a model: the free FIFO, the LRU (a list, front = next to
    evict), ref counts, each block's hash, and what each block holds (a label written at allocation).

    The stale-hash guard is an invariant: every hash the pool knows names a block whose *current* content
    is what was registered under it, and every block :meth:`lookup` returns holds the looked-up content.
    """

    @initialize(num_blocks=st.integers(1, 10))
    def setup(self, num_blocks):
        self.bm = BlockManager(num_blocks, 4, enable_prefix_caching=True)
        self.num_blocks = num_blocks
        self.free_ids = list(range(num_blocks))
        self.lru: list[int] = []
        self.refs: dict[int, int] = {}
        self.hashes: dict[int, bytes] = {}
        self.content: dict[int, int] = {}   # block -> label its K/V holds (blocks keep content when unused)
        self.held: list[int] = []
        self.evictions = 0

    # -- model helpers -----------------------------------------------------------------------------
    def _owner(self, h):
        return next((b for b, x in self.hashes.items() if x == h), None)

    def _take(self, n, labels):
        out = []
        for label in labels[:n]:
            if self.free_ids:
                b = self.free_ids.pop(0)
            else:
                b = self.lru.pop(0)
                del self.hashes[b]
                self.evictions += 1
            self.refs[b] = 1
            self.content[b] = label          # the caller writes new K/V into it
            out.append(b)
        return out

    def _acquire(self, ids):
        for b in ids:
            if self.refs.get(b, 0) == 0:
                self.lru.remove(b)
            self.refs[b] = self.refs.get(b, 0) + 1

    def _refused(self, exc_type, fn, *args):
        before = self.bm.snapshot()
        with pytest.raises(exc_type):
            fn(*args)
        assert self.bm.snapshot() == before

    # -- rules -------------------------------------------------------------------------------------
    @rule(labels=st.lists(st.sampled_from(LABELS), max_size=12))
    def allocate(self, labels):
        n = len(labels)
        if n > len(self.free_ids) + len(self.lru):
            self._refused(OutOfBlocksError, self.bm.allocate, n)
            return
        got = self.bm.allocate(n)
        assert got == self._take(n, labels)
        self.held += got

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def share(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.refs)), min_size=1, max_size=3))
        self.bm.share(ids)
        for b in ids:
            self.refs[b] += 1
        self.held += ids

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free(self, data):
        idx = data.draw(st.lists(st.integers(0, len(self.held) - 1), min_size=1, max_size=5, unique=True))
        ids = [self.held[i] for i in idx]
        for i in sorted(idx, reverse=True):
            del self.held[i]
        self.bm.free(ids)
        for b in ids:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                del self.refs[b]
                (self.lru if b in self.hashes else self.free_ids).append(b)

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def register(self, data):
        """Name a used block by its content; the same content elsewhere already named -> False."""
        b = data.draw(st.sampled_from(sorted(self.refs)))
        h = LABEL_HASH[self.content[b]]
        owner = self._owner(h)
        assert self.bm.register(b, h) is (owner in (None, b))
        if owner is None:
            self.hashes[b] = h

    @precondition(lambda self: self.hashes)
    @rule(data=st.data())
    def register_other_content(self, data):
        b = data.draw(st.sampled_from(sorted(b for b in self.hashes if b in self.refs) or [None]))
        if b is not None:
            other = next(h for h in LABEL_HASH.values() if h != self.hashes[b])
            self._refused(ValueError, self.bm.register, b, other)

    @rule(chain=st.lists(st.sampled_from([*LABEL_HASH.values(), UNKNOWN]), max_size=5))
    def lookup(self, chain):
        expected = []
        for h in chain:
            b = self._owner(h)
            if b is None:
                break
            expected.append(b)
        before = self.bm.snapshot()
        got = self.bm.lookup(chain)
        assert got == expected and self.bm.snapshot() == before
        for b, h in zip(got, chain):  # the stale-hash guard, as a caller sees it
            assert LABEL_HASH[self.content[b]] == h

    @precondition(lambda self: self.hashes)
    @rule(data=st.data())
    def acquire(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.hashes)), min_size=1, max_size=3))
        self.bm.acquire(ids)
        self._acquire(ids)
        self.held += ids

    @rule(data=st.data(), labels=st.lists(st.sampled_from(LABELS), max_size=4))
    def acquire_and_allocate(self, data, labels):
        cached = data.draw(st.lists(st.sampled_from(sorted(self.hashes)), max_size=3, unique=True)) \
            if self.hashes else []
        need = len(labels) + sum(1 for b in cached if b in self.lru)
        if need > len(self.free_ids) + len(self.lru):
            self._refused(OutOfBlocksError, self.bm.acquire_and_allocate, cached, len(labels))
            return
        got = self.bm.acquire_and_allocate(cached, len(labels))
        self._acquire(cached)
        assert got == cached + self._take(len(labels), labels)
        self.held += got

    @rule(data=st.data())
    def bad_acquire(self, data):
        """One id that holds no cached content (free, used unnamed, outside, a bool) among good ones."""
        unnamed = [b for b in range(self.num_blocks) if b not in self.hashes]
        bad = data.draw(st.sampled_from(unnamed + [self.num_blocks, -1, True]))
        good = data.draw(st.lists(st.sampled_from(sorted(self.hashes)), max_size=2)) if self.hashes else []
        ids = data.draw(st.permutations(good + [bad]))
        self._refused(ValueError, self.bm.acquire, ids)
        self._refused(ValueError, self.bm.acquire_and_allocate, ids, 0)

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def matches_model(self):
        s = self.bm.snapshot()
        assert list(s.free_ids) == self.free_ids and list(s.evictable_ids) == self.lru
        assert list(s.ref_counts) == [self.refs.get(b, 0) for b in range(self.num_blocks)]
        assert list(s.block_hashes) == [self.hashes.get(b) for b in range(self.num_blocks)]
        assert s.num_evictions == self.evictions == self.bm.num_evictions
        assert sorted(self.held) == sorted(b for b, c in self.refs.items() for _ in range(c))

    @invariant()
    def counts(self):
        bm = self.bm
        assert bm.num_free_blocks == len(self.free_ids) + len(self.lru)
        assert bm.num_used_blocks == len(self.refs) and bm.num_evictable_blocks == len(self.lru)
        assert bm.num_cached_blocks == len(self.hashes)
        assert bm.num_free_blocks + bm.num_used_blocks == self.num_blocks

    @invariant()
    def no_stale_hash(self):
        """Every named block holds the content its name says, whether used or evictable."""
        for b in range(self.num_blocks):
            h = self.bm.block_hash(b)
            if h is not None:
                assert LABEL_HASH[self.content[b]] == h and self.bm.lookup([h]) == [b]

    @invariant()
    def checker_agrees(self):
        self.bm.check_invariants()


TestCachingBlockManagerMachine = CachingBlockManagerMachine.TestCase
