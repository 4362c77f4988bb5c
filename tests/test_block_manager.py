"""BlockManager: step by step (free list drawn in comments, as vLLM's queue tests do), errors that change
nothing, and a Hypothesis state machine against a plain-dict model with the three invariants."""
import re

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagedkv.block_manager import BlockManager, InvariantError, OutOfBlocksError


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
    code = ("from pagedkv.block_manager import BlockManager\n"
            "bm = BlockManager(4, 4); bm.allocate(2); bm._ref_counts[0] = 0\n"
            "try:\n    bm.check_invariants()\nexcept Exception as e:\n    print('raised', type(e).__name__)\n"
            "else:\n    print('nothing')\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "raised InvariantError", out.stdout + out.stderr
