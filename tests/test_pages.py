"""Paged KV bookkeeping with exact page ids and free-list order (no torch)."""
import pytest

from inferix.pages import AdmissionError, KVManager, PageAllocator


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
