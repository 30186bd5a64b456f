"""Shared start prefixes: a session with a kept start runs no prefill and makes the frames it would make alone."""
import numpy as np
import pytest

from inferix.engine import Engine
from inferix.models.bundle import load_model
from inferix.plan import PREFILL

PROMPT = "a red cube in a snowy field"


def toy(**kw):
    return Engine.from_pretrained("toyworld", max_sessions=3, **kw)


def tiny(**kw):
    return Engine(load_model("tiny"), window=6, max_sessions=2, **kw)


def count_prefill(eng) -> dict:
    """sid -> PREFILL rows it ran."""
    rows = {}

    def hook(plan, outs):
        for g in plan.groups:
            if g.kind == PREFILL:
                for r in g.rows:
                    rows[r.sid] = rows.get(r.sid, 0) + 1
    eng.hooks.append(hook)
    return rows


def frames(sess) -> np.ndarray:
    return np.concatenate(list(sess))


def test_toyworld_start_frames_depend_on_the_seed():
    b = load_model("toyworld")
    assert np.array_equal(b.start_frames(PROMPT, 1), b.start_frames(PROMPT, 1))
    assert not np.array_equal(b.start_frames(PROMPT, 1), b.start_frames(PROMPT, 2))


@pytest.mark.slow
def test_toyworld_same_start_hits_runs_no_prefill_and_makes_the_same_frames():
    eng = toy(share_prefixes=True)
    rows = count_prefill(eng)
    a = eng.open_session(PROMPT, num_frames=12, seed=1)
    frames(a)
    assert rows == {a.id: 2} and eng.stats()["prefixes"]["holders"] == 1
    start = eng.bundle.start_frames(PROMPT, 1)
    b = eng.open_session(PROMPT, num_frames=12, seed=7, init_frames=start, actions=["up"] * 12)  # same start
    got_b = frames(b)
    c = eng.open_session(PROMPT, num_frames=8, seed=1)  # "auto": the simulator's start for seed 1 again
    got_c = frames(c)
    assert b.id not in rows and c.id not in rows
    st = eng.stats()["prefixes"]
    assert (st["hits"], st["misses"], st["holders"]) == (2, 1, 1)
    assert set(eng.sessions) <= {a.id, b.id, c.id}  # the holder is hidden

    ref = toy()
    want_b = frames(ref.open_session(PROMPT, num_frames=12, seed=7, init_frames=start, actions=["up"] * 12))
    want_c = frames(ref.open_session(PROMPT, num_frames=8, seed=1))
    assert np.array_equal(got_b, want_b) and np.array_equal(got_c, want_c)


def test_tiny_explicit_init_frames_hit_and_match_a_non_shared_engine():
    init = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    eng = tiny(share_prefixes=True)
    rows = count_prefill(eng)
    frames(eng.open_session("a boat", num_frames=8, seed=1, init_frames=init))
    b = eng.open_session("a boat", num_frames=11, seed=2, init_frames=init.copy())  # equal frames, a new array
    got = frames(b)
    assert b.id not in rows and eng.stats()["prefixes"]["hits"] == 1
    want = frames(tiny().open_session("a boat", num_frames=11, seed=2, init_frames=init))
    assert np.array_equal(got, want)


@pytest.mark.slow
def test_hit_while_the_first_session_still_runs():
    eng = toy(share_prefixes=True)
    rows = count_prefill(eng)
    a = eng.open_session(PROMPT, num_frames=16, seed=1)
    while a.id not in rows or eng.stats()["prefixes"]["holders"] == 0:
        eng.step()
    b = eng.open_session(PROMPT, num_frames=16, seed=3, init_frames=eng.bundle.start_frames(PROMPT, 1))
    eng.run_until_idle()
    got = np.concatenate(b.poll())
    assert b.id not in rows and len(a.poll()) == 4
    ref = toy()
    want = frames(ref.open_session(PROMPT, num_frames=16, seed=3, init_frames=ref.bundle.start_frames(PROMPT, 1)))
    assert got.shape == want.shape  # batched with a: equal up to the batched kernels' rounding
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


@pytest.mark.parametrize("change", ["prompt", "frames", "seed"])
def test_different_prompt_or_start_frames_misses(change):
    eng = toy(share_prefixes=True)
    rows = count_prefill(eng)
    frames(eng.open_session(PROMPT, num_frames=8, seed=1))
    start = eng.bundle.start_frames(PROMPT, 1)
    if change == "prompt":
        s = eng.open_session("a blue ball", num_frames=8, seed=1, init_frames=start)
    elif change == "frames":
        other = start.copy()
        other[0, 0, 0] ^= 255
        s = eng.open_session(PROMPT, num_frames=8, seed=1, init_frames=other)
    else:  # "auto" start frames of another seed
        s = eng.open_session(PROMPT, num_frames=8, seed=2)
    frames(s)
    st = eng.stats()["prefixes"]
    assert rows[s.id] == 2 and (st["hits"], st["misses"], st["holders"]) == (0, 2, 2)


@pytest.mark.slow
def test_pressure_evicts_holders_and_pages_return_to_zero():
    eng = toy(share_prefixes=True, max_prefixes=2)  # 48 pages: three windows of 16
    for p in ("one", "two", "three"):
        frames(eng.open_session(p, num_frames=8, seed=0))
    st = eng.stats()["prefixes"]
    assert (st["holders"], st["evicted"]) == (2, 1) and eng.kv.reserved == 16  # two holders of 8 pages
    runs = [eng.open_session(f"endless {i}", num_frames=None, seed=i) for i in range(3)]  # 16 pages each
    assert eng.waiting == 0 and all(s.status == "running" for s in runs)
    st = eng.stats()["prefixes"]
    assert (st["holders"], st["evicted"]) == (0, 3)
    eng.run_until_idle(max_steps=8)
    for s in runs:
        s.cancel()
    assert eng.stats()["prefixes"]["holders"] == 0  # no room was left to keep the endless ones' prefixes
    frames(eng.open_session("four", num_frames=8, seed=0))
    assert eng.kv.reserved == 8 and eng.pages_in_use == 8  # its prefix is kept
    assert eng.clear_prefixes() == 1
    assert eng.kv.reserved == 0 and eng.pages_in_use == 0


def test_a_hit_that_fits_only_without_its_holder_takes_its_pages():
    eng = toy(share_prefixes=True)
    rows = count_prefill(eng)
    frames(eng.open_session(PROMPT, num_frames=8, seed=1))  # keeps an 8-page prefix
    busy = [eng.open_session(f"busy {i}", num_frames=None, seed=i, init_frames=None) for i in range(2)]
    assert eng.kv.reserved == 8 + 32
    s = eng.open_session(PROMPT, num_frames=None, seed=5, init_frames=eng.bundle.start_frames(PROMPT, 1))
    st = eng.stats()["prefixes"]
    assert s.status == "running" and (st["hits"], st["holders"]) == (1, 0) and eng.kv.reserved == 48
    eng.run_until_idle(max_steps=6)
    assert s.id not in rows and s.frames_out > 0
    for x in busy + [s]:
        x.cancel()
    assert eng.kv.reserved == 0 and eng.pages_in_use == 0


def test_a_waiting_session_frees_kept_prefixes_first():
    eng = toy(share_prefixes=True)
    frames(eng.open_session(PROMPT, num_frames=8, seed=1))
    busy = [eng.open_session(f"busy {i}", num_frames=None, seed=i, init_frames=None) for i in range(2)]
    late = eng.open_session("another scene", num_frames=None, seed=3)  # a miss of 16 pages: 8 + 32 + 16 > 48
    assert late.status == "running" and eng.stats()["prefixes"]["evicted"] == 1
    for x in busy + [late]:
        x.cancel()
    eng.clear_prefixes()
    assert eng.kv.reserved == 0 and eng.pages_in_use == 0


def test_share_prefixes_off_is_unchanged():
    eng = toy()
    rows = count_prefill(eng)
    a = frames(eng.open_session(PROMPT, num_frames=8, seed=1))
    s = eng.open_session(PROMPT, num_frames=8, seed=1)
    b = frames(s)
    assert rows[s.id] == 2 and np.array_equal(a, b)
    assert eng.prefixes is None and eng.scheduler.reclaim is None and "prefixes" not in eng.stats()
    assert eng.kv.reserved == 0 and eng.pages_in_use == 0


def test_max_prefixes_is_checked():
    with pytest.raises(ValueError, match="max_prefixes must be an int >= 1"):
        toy(share_prefixes=True, max_prefixes=0)
