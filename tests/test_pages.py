"""Paged KV bookkeeping with exact page ids and free-list order (no torch)."""
import pytest

from inferix.pages import AdmissionError, KVManager, PageAllocator, SavedTable, kept_frames, recent_for_block


def test_allocator_fifo_reuse_and_refcounts():
    a = PageAllocator(11)
    assert a.allocate(3) == [0, 1, 2]
    assert a.allocate(2) == [3, 4]
    a.decref([1, 3])
    assert list(a.free) == [5, 6, 7, 8, 9, 10, 1, 3]
    a.incref([2])
    a.decref([2])
    assert a.refs[2] == 1 and 2 not in a.free
    a.decref([2])
    assert list(a.free)[-1] == 2
    with pytest.raises(RuntimeError, match="freed twice"):
        a.decref([2])
    assert not a.can_allocate(12)


def test_window_sink_eviction_exact_pages():
    kv = KVManager(num_pages=11, block_frames=2, window_frames=6, sink_frames=2)
    kv.allocate(7, kv.budget_for(None))
    assert kv.reserved == 6
    pages_per_block = []
    for _ in range(4):
        kv.begin_block(7)
        pages_per_block.append(kv.commit(7, 2))
    assert pages_per_block == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # after 4 blocks: sink = frames 0,1 (pages 0,1); the window keeps 6-2-2 = 2 recent frames for the next block
    evicted = kv.begin_block(7)  # blocks 4 and 5 evicted frames 2,3 then 4,5: one block each time
    assert evicted == [4, 5]
    pages, frames = kv.context(7)
    assert pages == [0, 1, 6, 7] and frames == [0, 1, 6, 7]
    assert list(kv.alloc.free) == [8, 9, 10, 2, 3, 4, 5]
    assert kv.commit(7, 2) == [8, 9]
    assert kv.begin_block(7) == [6, 7]
    assert kv.context(7) == ([0, 1, 8, 9], [0, 1, 8, 9])
    kv.free(7)
    assert kv.pages_in_use == 0 and kv.reserved == 0


def test_fork_shares_pages_and_frees_on_last_owner():
    kv = KVManager(num_pages=11, block_frames=1, window_frames=3)
    kv.allocate(1, 3)
    kv.begin_block(1); kv.commit(1, 1)
    kv.begin_block(1); kv.commit(1, 1)
    kv.fork(1, 2)
    assert kv.context(2) == ([0, 1], [0, 1])
    assert kv.alloc.refs[:2] == [2, 2]
    assert kv.begin_block(2) == []
    assert kv.commit(2, 1) == [2]
    assert kv.begin_block(2) == [0]  # evicted from the child only: still owned by the parent
    assert kv.commit(2, 1) == [3]
    assert kv.begin_block(2) == [1]
    assert kv.alloc.refs[:2] == [1, 1] and 0 not in kv.alloc.free
    kv.free(1)
    assert list(kv.alloc.free)[-2:] == [0, 1]
    kv.free(2)
    assert kv.pages_in_use == 0


def test_admission_is_side_effect_free_and_refuses_impossible():
    kv = KVManager(num_pages=8, block_frames=2, window_frames=6)
    assert kv.can_allocate(6)
    kv.allocate(1, 6)
    assert not kv.can_allocate(6) and kv.reserved == 6
    with pytest.raises(AdmissionError, match="pool has only 8"):
        kv.check_fits_ever(10)
    assert kv.budget_for(4) == 4  # a short session reserves only the frames it will commit
    with pytest.raises(ValueError, match="window"):
        KVManager(num_pages=8, block_frames=3, window_frames=4, sink_frames=3)


def test_unbounded_global_attention_needs_length():
    kv = KVManager(num_pages=8, block_frames=3)
    with pytest.raises(AdmissionError):
        kv.budget_for(None)
    assert kv.budget_for(9) == 9


def test_block_table_pairs_frames_with_pages():
    kv = KVManager(num_pages=11, block_frames=2, window_frames=6, sink_frames=2)
    kv.allocate(3, 6)
    for _ in range(4):
        kv.begin_block(3)
        kv.commit(3, 2)
    kv.begin_block(3)  # sink frames 0,1 and the latest block (frames 6,7) stay
    assert kv.block_table(3) == [(0, 0), (1, 1), (6, 6), (7, 7)]
    assert dict(kv.block_table(3)) == {0: 0, 1: 1, 6: 6, 7: 7}
    assert kv.holds(3) and not kv.holds(4)
    assert kv.held_pages(3) == [0, 1, 6, 7] and kv.budget_of(3) == 6 and kv.frames_committed(3) == 8
    assert kv.free_pages == 7 and kv.unreserved == 5


def test_take_and_restore_table_onto_fresh_pages():
    kv = KVManager(num_pages=8, block_frames=1, window_frames=4, sink_frames=1)
    kv.allocate(1, 4)
    for _ in range(5):
        kv.begin_block(1)
        kv.commit(1, 1)
    assert kv.block_table(1) == [(0, 0), (2, 2), (3, 3), (4, 4)]
    saved = kv.save_table(1)
    assert saved == SavedTable(budget=4, sink_frames=[0], window_frames=[2, 3, 4], frames_committed=5)
    assert kv.block_table(1) == [(0, 0), (2, 2), (3, 3), (4, 4)]  # saving changes nothing
    taken = kv.take_table(1)
    assert taken == saved and not kv.holds(1) and kv.reserved == 0 and kv.pages_in_use == 0
    assert list(kv.alloc.free) == [5, 6, 7, 1, 0, 2, 3, 4]
    kv.allocate(9, taken.budget)
    pages = kv.restore_table(9, taken)
    assert pages == [5, 6, 7, 1]
    assert kv.block_table(9) == [(0, 5), (2, 6), (3, 7), (4, 1)]
    assert kv.frames_committed(9) == 5 and kv.save_table(9) == taken
    kv.begin_block(9)  # the restored session goes on as the original would: sink kept, oldest window page out
    assert kv.commit(9, 1) == [0] and kv.block_table(9) == [(0, 5), (3, 7), (4, 1), (5, 0)]
    with pytest.raises(RuntimeError, match="already holds pages"):
        kv.restore_table(9, taken)
    kv.allocate(10, 2)
    with pytest.raises(RuntimeError, match="budget 2"):
        kv.restore_table(10, taken)
    assert kv.held_pages(10) == []


def test_one_sink_window_rule():
    assert kept_frames(range(10), sink=2, recent=3) == [0, 1, 7, 8, 9]
    assert kept_frames([0, 1, 5, 6], sink=2, recent=5) == [0, 1, 5, 6]  # fewer than recent: all stay
    assert kept_frames(range(6), sink=0, recent=0) == []
    assert kept_frames(range(4), sink=9, recent=0) == [0, 1, 2, 3]  # all in the sink
    assert kept_frames([3, 4, 8], sink=2, recent=None) == [3, 4, 8]
    assert recent_for_block(12, 3, 3) == 6 and recent_for_block(4, 3, 3) == 0 and recent_for_block(None, 3, 3) is None
    # the block table keeps what the rule keeps, for blocks of any size
    kv = KVManager(num_pages=20, block_frames=3, window_frames=9, sink_frames=2)
    kv.allocate(1, 9)
    for n in (3, 1, 3, 2, 3, 3):
        before = [f for f, _ in kv.block_table(1)]
        kv.begin_block(1, n)
        assert [f for f, _ in kv.block_table(1)] == kept_frames(before, 2, recent_for_block(9, 2, n))
        kv.commit(1, n)
