"""The scheduler's exact rows, step by step, on plain ints (no torch, no model).

Each test builds a small page pool, adds sessions, and runs ``schedule()`` / ``update()`` by hand. The expected
rows are written out from the rules (pages come off a FIFO free list; a block evicts what its window will not see;
a switched prompt is recached at the block boundary; a fork shares pages and copies them before writing), not
computed by the code under test. A row reads (sid, kind, step, block, frame_start, nframes, context pages, context
frames, write pages).
"""
import subprocess
import sys

import pytest

from inferix.pages import KVManager
from inferix.plan import COMMIT, DENOISE, PREFILL, RECACHE
from inferix.scheduler import FINISHED, PAUSED, RUNNING, WAITING, Scheduler, SeqState

P, R, D, C = PREFILL, RECACHE, DENOISE, COMMIT


def step(sched):
    """One engine step without a runner: the plan's rows as tuples, then the counters advance."""
    plan = sched.schedule()
    rows = [(r.sid, r.kind, r.step, r.block, r.frame_start, r.nframes, r.context_pages, r.context_frames,
             r.write_pages) for r in plan.rows()]
    sched.update(plan)
    return rows


def detail(sched):
    """One step, keeping what the runner reads beside the pages: (kind, prompt, actions, last_step, gen_start)."""
    plan = sched.schedule()
    out = [(r.kind, r.prompt, r.actions, r.last_step, r.gen_start) for r in plan.rows()]
    sched.update(plan)
    return out


def test_scheduler_imports_no_torch():
    code = ("import sys; import inferix.scheduler, inferix.pages, inferix.plan, inferix.session_plan; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prefill_then_window_with_sink():
    # 3 given frames prefilled in chunks of 2 and 1, then 3 blocks of 2 frames; window 5 frames with 1 sink frame
    kv = KVManager(11, block_frames=2, window_frames=5, sink_frames=1)
    sched = Scheduler(kv, num_steps=2, block_frames=2)
    sched.add(SeqState(sid=0, prompt="a", total_blocks=3, budget=5, prefill_chunks=[2, 1], n_init=3))
    assert sched.seqs[0].status == RUNNING
    assert step(sched) == [(0, P, 0, 0, 0, 2, [], [], [0, 1])]  # frame 0 -> sink, frame 1 -> window
    assert step(sched) == [(0, P, 0, 0, 2, 1, [0, 1], [0, 1], [2])]
    # block 0: sink 1 + window keeps 5 - 2 - 1 = 2 frames: nothing to evict yet
    assert step(sched) == [(0, D, 0, 0, 3, 2, [0, 1, 2], [0, 1, 2], None)]
    assert step(sched) == [(0, D, 1, 0, 3, 2, [0, 1, 2], [0, 1, 2], None)]
    assert step(sched) == [(0, C, 0, 0, 3, 2, [0, 1, 2], [0, 1, 2], [3, 4])]
    # block 1 evicts frames 1 and 2 (pages 1, 2 go to the back of the free list); the sink stays
    assert step(sched) == [(0, D, 0, 1, 5, 2, [0, 3, 4], [0, 3, 4], None)]
    assert list(kv.alloc.free) == [5, 6, 7, 8, 9, 10, 1, 2]
    assert step(sched) == [(0, D, 1, 1, 5, 2, [0, 3, 4], [0, 3, 4], None)]
    assert step(sched) == [(0, C, 0, 1, 5, 2, [0, 3, 4], [0, 3, 4], [5, 6])]
    assert step(sched) == [(0, D, 0, 2, 7, 2, [0, 5, 6], [0, 5, 6], None)]
    assert step(sched) == [(0, D, 1, 2, 7, 2, [0, 5, 6], [0, 5, 6], None)]
    seq = sched.seqs[0]
    assert step(sched) == [(0, C, 0, 2, 7, 2, [0, 5, 6], [0, 5, 6], [7, 8])]
    assert seq.status == FINISHED and sched.seqs == {} and kv.pages_in_use == 0 and kv.reserved == 0
    assert list(kv.alloc.free) == [9, 10, 1, 2, 3, 4, 0, 5, 6, 7, 8]
    assert step(sched) == []


def test_independent_first_frame_block_and_eviction():
    kv = KVManager(8, block_frames=2, window_frames=4, sink_frames=1)
    sched = Scheduler(kv, num_steps=1, block_frames=2)
    sched.add(SeqState(sid=0, prompt="a", total_blocks=3, budget=4, first_block_frames=1))
    assert step(sched) == [(0, D, 0, 0, 0, 1, [], [], None)]
    assert step(sched) == [(0, C, 0, 0, 0, 1, [], [], [0])]  # frame 0: the sink
    assert step(sched) == [(0, D, 0, 1, 1, 2, [0], [0], None)]
    assert step(sched) == [(0, C, 0, 1, 1, 2, [0], [0], [1, 2])]
    # window 4 = sink 1 + block 2 + 1 older frame: frame 1 (page 1) goes
    assert step(sched) == [(0, D, 0, 2, 3, 2, [0, 2], [0, 2], None)]
    assert list(kv.alloc.free) == [3, 4, 5, 6, 7, 1]
    assert step(sched) == [(0, C, 0, 2, 3, 2, [0, 2], [0, 2], [3, 4])]
    assert kv.pages_in_use == 0


def test_prompt_switches_recache_and_actions():
    kv = KVManager(8, block_frames=2)
    sched = Scheduler(kv, num_steps=1, block_frames=2)
    seq = SeqState(sid=0, prompt="a", total_blocks=3, budget=6, recache_on_switch=True, prompt_plan={1: "b"},
                   action_plan={0: 2, 3: 1})
    sched.add(seq)
    # block 0: frame 0 sets action 2, frame 1 holds it; no prompt change, nothing to recache
    assert detail(sched) == [(D, None, [2, 2], True, 0)]
    assert step(sched) == [(0, C, 0, 0, 0, 2, [], [], [0, 1])]
    # block 1 switches to "b" (prompt plan): the two committed frames are recached first, in their own pages
    rows = sched.schedule()
    assert [(r.kind, r.frame_start, r.nframes, r.context_pages, r.context_frames, r.write_pages, r.prompt)
            for r in rows.rows()] == [(R, 0, 2, [], [0, 1], [0, 1], "b")]
    sched.update(rows)
    assert detail(sched) == [(D, "b", [2, 1], True, 2)]  # frame 3 sets action 1
    seq.pending_prompt, seq.pending_action = "c", 3  # asked mid-block: both wait for the next block
    assert step(sched) == [(0, C, 0, 1, 2, 2, [0, 1], [0, 1], [2, 3])]
    assert step(sched) == [(0, R, 0, 2, 0, 4, [], [0, 1, 2, 3], [0, 1, 2, 3])]
    assert seq.prompt == "c" and seq.pending_prompt is None
    assert detail(sched) == [(D, "c", [3, 3], True, 4)]
    assert step(sched) == [(0, C, 0, 2, 4, 2, [0, 1, 2, 3], [0, 1, 2, 3], [4, 5])]
    assert seq.status == FINISHED and kv.pages_in_use == 0


def test_same_prompt_is_no_switch():
    kv = KVManager(8, block_frames=2)
    sched = Scheduler(kv, num_steps=1, block_frames=2)
    sched.add(SeqState(sid=0, prompt="a", total_blocks=2, budget=4, recache_on_switch=True, prompt_plan={1: "a"}))
    assert [k for k, *_ in (detail(sched) + detail(sched) + detail(sched))] == [D, C, D]


def test_fork_shares_pages_and_copies_them_on_recache():
    kv = KVManager(12, block_frames=2)
    sched = Scheduler(kv, num_steps=1, block_frames=2)
    sched.add(SeqState(sid=0, prompt="a", total_blocks=3, budget=6, recache_on_switch=True, action_plan={0: 1}))
    assert step(sched) == [(0, D, 0, 0, 0, 2, [], [], None)]
    assert step(sched) == [(0, C, 0, 0, 0, 2, [], [], [0, 1])]
    parent = sched.seqs[0]
    child = sched.fork(0, 1)
    assert child is sched.seqs[1] and child.sid == 1 and child.status == PAUSED
    assert (child.prompt, child.block, child.step, child.budget, child.action, child.block_started) == \
        ("a", 1, 0, 6, 1, False)
    assert child.action_plan == parent.action_plan and child.action_plan is not parent.action_plan
    assert child.block_actions == [1, 1] and child.block_actions is not parent.block_actions
    assert kv.held_pages(1) == [0, 1] and kv.alloc.refs[:2] == [2, 2] and kv.reserved == 12
    assert step(sched) == [(0, D, 0, 1, 2, 2, [0, 1], [0, 1], None)]  # the paused fork does not run
    child.pending_prompt, child.status = "b", RUNNING
    # the fork switches prompt: its shared pages 0, 1 are swapped for fresh 4, 5 (the parent's commit took
    # 2, 3 first, in row order) before the recache writes them
    plan = sched.schedule()
    assert [(g.kind, [r.sid for r in g.rows]) for g in plan.groups] == [(C, [0]), (R, [1])]
    sched.update(plan)
    assert [(r.sid, r.kind, r.frame_start, r.nframes, r.context_pages, r.context_frames, r.write_pages)
            for r in plan.rows()] == [(0, C, 2, 2, [0, 1], [0, 1], [2, 3]), (1, R, 0, 2, [], [0, 1], [4, 5])]
    assert kv.held_pages(0) == [0, 1, 2, 3] and kv.held_pages(1) == [4, 5] and kv.alloc.refs[:2] == [1, 1]
    assert step(sched) == [(0, D, 0, 2, 4, 2, [0, 1, 2, 3], [0, 1, 2, 3], None),
                           (1, D, 0, 1, 2, 2, [4, 5], [0, 1], None)]
    assert step(sched) == [(0, C, 0, 2, 4, 2, [0, 1, 2, 3], [0, 1, 2, 3], [6, 7]),
                           (1, C, 0, 1, 2, 2, [4, 5], [0, 1], [8, 9])]
    assert 0 not in sched.seqs and list(kv.alloc.free) == [10, 11, 0, 1, 2, 3, 6, 7]
    assert step(sched) == [(1, D, 0, 2, 4, 2, [4, 5, 8, 9], [0, 1, 2, 3], None)]
    assert step(sched) == [(1, C, 0, 2, 4, 2, [4, 5, 8, 9], [0, 1, 2, 3], [10, 11])]
    assert kv.pages_in_use == 0 and kv.reserved == 0


def test_recache_without_room_for_copies_keeps_the_old_kv():
    kv = KVManager(6, block_frames=1)
    sched = Scheduler(kv, num_steps=1, block_frames=1)
    sched.add(SeqState(sid=0, prompt="a", total_blocks=3, budget=3, recache_on_switch=True))
    for _ in range(4):
        step(sched)
    assert kv.held_pages(0) == [0, 1]
    child = sched.fork(0, 1)
    child.pending_prompt, child.status = "b", RUNNING
    sched.seqs[0].status = PAUSED
    # copying 2 shared pages would make the fork hold 4 pages, over its budget of 3: no recache, the prompt
    # still reaches the runner on the block's first denoise row
    plan = sched.schedule()
    assert [(r.sid, r.kind, r.context_pages, r.prompt) for r in plan.rows()] == [(1, D, [0, 1], "b")]
    sched.update(plan)
    assert step(sched) == [(1, C, 0, 2, 2, 1, [0, 1], [0, 1], [2])]
    assert kv.alloc.refs[:3] == [1, 1, 0]  # the fork has finished; its parent still holds 0 and 1


def test_finished_session_frees_pages_and_admits_the_waiting_one():
    kv = KVManager(4, block_frames=2)
    sched = Scheduler(kv, num_steps=1, block_frames=2)
    sched.add(SeqState(sid=0, prompt="a", total_blocks=2, budget=4))
    b = SeqState(sid=1, prompt="b", total_blocks=1, budget=2)
    sched.add(b)
    assert b.status == WAITING and sched.waiting_position(1) == 0
    assert step(sched) == [(0, D, 0, 0, 0, 2, [], [], None)]
    assert step(sched) == [(0, C, 0, 0, 0, 2, [], [], [0, 1])]
    assert step(sched) == [(0, D, 0, 1, 2, 2, [0, 1], [0, 1], None)]
    plan = sched.schedule()
    assert sched.update(plan) == [0]  # finished: its pages go back and session 1 is admitted at once
    assert b.status == RUNNING and list(kv.alloc.free) == [0, 1, 2, 3]
    assert step(sched) == [(1, D, 0, 0, 0, 2, [], [], None)]
    assert step(sched) == [(1, C, 0, 0, 0, 2, [], [], [0, 1])]
    assert sched.seqs == {} and kv.pages_in_use == 0 and step(sched) == []


def test_rows_group_by_kind_and_size_up_to_max_batch():
    kv = KVManager(12, block_frames=2)
    sched = Scheduler(kv, num_steps=1, block_frames=2, max_batch=2)
    for sid in range(3):
        sched.add(SeqState(sid=sid, prompt="a", total_blocks=1, budget=2))
    sched.add(SeqState(sid=3, prompt="a", total_blocks=1, budget=2, first_block_frames=1))
    plan = sched.schedule()
    assert [(g.kind, g.nframes, [r.sid for r in g.rows]) for g in plan.groups] == \
        [(D, 2, [0, 1]), (D, 2, [2]), (D, 1, [3])]


def test_share_and_take_over_committed_pages():
    kv = KVManager(8, block_frames=2)
    sched = Scheduler(kv, num_steps=1, block_frames=2)
    sched.add(SeqState(sid=0, prompt="a", total_blocks=2, budget=4))
    step(sched), step(sched)
    b = SeqState(sid=1, prompt="b", total_blocks=1, budget=4, n_init=2)
    sched.share(0, b)  # b starts after the 2 committed frames, reading them from the same pages
    assert b.status == RUNNING and kv.alloc.refs[:2] == [2, 2] and kv.reserved == 8
    assert step(sched) == [(0, D, 0, 1, 2, 2, [0, 1], [0, 1], None), (1, D, 0, 0, 2, 2, [0, 1], [0, 1], None)]
    assert step(sched) == [(0, C, 0, 1, 2, 2, [0, 1], [0, 1], [2, 3]), (1, C, 0, 0, 2, 2, [0, 1], [0, 1], [4, 5])]
    assert sched.seqs == {} and list(kv.alloc.free) == [6, 7, 2, 3, 0, 1, 4, 5]

    kv = KVManager(6, block_frames=2)
    sched = Scheduler(kv, num_steps=1, block_frames=2)
    a = SeqState(sid=0, prompt="a", total_blocks=2, budget=4)
    sched.add(a)
    step(sched), step(sched)
    small = SeqState(sid=1, prompt="b", total_blocks=1, budget=1)
    with pytest.raises(RuntimeError, match="reserves 1 pages, fewer than the 2 it would share"):
        sched.share(0, small)
    b = SeqState(sid=1, prompt="b", total_blocks=1, budget=4, n_init=2)
    with pytest.raises(RuntimeError, match=r"no KV budget left to share session 0's pages \(4 pages needed\)"):
        sched.share(0, b)  # 4 + 4 pages reserved would be over the pool of 6
    assert kv.reserved == 4 and kv.alloc.refs[:2] == [1, 1] and not kv.holds(1)
    sched.share(0, b, take=True)  # session 0 ends and hands its pages over; its reservation goes first
    assert a.status == "cancelled" and 0 not in sched.seqs and kv.reserved == 4 and kv.alloc.refs[:2] == [1, 1]
    assert step(sched) == [(1, D, 0, 0, 2, 2, [0, 1], [0, 1], None)]
    assert step(sched) == [(1, C, 0, 0, 2, 2, [0, 1], [0, 1], [2, 3])]
    assert list(kv.alloc.free) == [4, 5, 0, 1, 2, 3] and kv.reserved == 0
    with pytest.raises(RuntimeError, match="session 0 has ended"):
        sched.share(0, SeqState(sid=2, prompt="c", total_blocks=1, budget=2))
