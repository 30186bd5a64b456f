"""The demo's limits and fault isolation on the hub with the tiny model at 32x32 (no server, no browser):
a failed session ends alone, seeds and prompts are checked before anything opens, idle and unattended streams
are ended and freed, the waiting line and the recordings of all tabs are bounded, downloads do not name the tab."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from browser_utils import wait_until

PROMPT = "a cat runs in the snow"


@pytest.fixture
def make_hub():
    """Hubs with the tiny model; streams run until stopped unless max_frames is given. All are closed after."""
    from inferix.app.hub import DemoConfig, Hub
    hubs = []

    def make(**kw):
        cfg = dict(model="tiny", device="cpu", height=32, width=32, max_sessions=2, max_frames=0, snapshots=0)
        cfg.update(kw)
        hubs.append(Hub(DemoConfig(**cfg)))
        return hubs[-1]
    try:
        yield make
    finally:
        for h in hubs:
            h.close()


def frames_grow(hub, key: str, what: str, n: int = 24):
    tab = hub.tabs[key]
    start = tab.total_frames
    wait_until(lambda: hub.stats(key) and tab.total_frames >= start + n, 10, what)


# ---- fault isolation ----------------------------------------------------------------------------------------
def test_failed_session_ends_alone_and_the_hub_recovers(make_hub, monkeypatch):
    hub = make_hub(max_sessions=3)
    good = hub.start("good", PROMPT, seed=1)
    frames_grow(hub, "good", "the good stream's frames")
    hub.toggle_pause("good")  # not batched with the bad stream's step
    bad_ids = set()
    real = hub.engine.runner.execute

    def execute(plan):
        if any(r.sid in bad_ids for r in plan.rows()):
            raise RuntimeError("boom: a bad row")
        return real(plan)
    monkeypatch.setattr(hub.engine.runner, "execute", execute)
    with hub.locked():  # the stepping thread sees the session only once it is marked bad
        bad = hub.start("bad", PROMPT, seed=2)
        bad_ids.add(bad.session.id)
    wait_until(lambda: "boom" in hub.stats("bad")["message"], 10, "the bad tab's error")
    assert bad.session.status == "failed"
    assert hub.stats("bad")["message"] == "generation failed: RuntimeError: boom: a bad row"
    # the failure is the bad tab's alone: the others, and tabs opened after it, never show it
    assert hub.step_error == ""
    assert hub.stats("good")["message"] == "" and good.session.status == "paused"
    assert hub.stats("new")["message"] == ""
    hub.toggle_pause("good")
    frames_grow(hub, "good", "the good stream to go on")
    hub.start("new", PROMPT, seed=3)
    frames_grow(hub, "new", "a new tab's stream")
    assert hub.stats("new")["message"] == "" and hub.stats("good")["message"] == ""
    hub.start("bad", PROMPT, seed=2)  # a new stream in the failed tab starts cleanly
    frames_grow(hub, "bad", "the failed tab's new stream")
    assert hub.stats("bad")["message"] == ""
    for key in ("good", "new", "bad"):
        hub.stop(key)
    assert hub.engine.pages_in_use == 0


def test_a_failure_no_session_owns_shows_no_details_and_clears(make_hub, monkeypatch):
    from inferix.app.hub import STEP_FAILED
    hub = make_hub()
    hub.start("run", PROMPT, seed=1)
    frames_grow(hub, "run", "frames")
    broken = threading.Event()
    broken.set()
    real = hub.engine.scheduler.schedule

    def schedule():
        if broken.is_set():
            raise RuntimeError("scheduler exploded")
        return real()
    monkeypatch.setattr(hub.engine.scheduler, "schedule", schedule)
    wait_until(lambda: hub.step_error, 5, "the step error")
    assert "scheduler exploded" in hub.step_error
    assert hub.stats("run")["message"] == STEP_FAILED  # a running tab learns the engine stalls, not the details
    assert hub.stats("idle")["message"] == ""  # a tab without a stream is not bothered
    broken.clear()
    wait_until(lambda: not hub.step_error, 5, "the step error to clear after a good step")
    assert hub.stats("run")["message"] == ""
    frames_grow(hub, "run", "the stream to go on")


# ---- input checks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1e20, 2 ** 64, 2 ** 63, "abc", -1, "-5", 1.5, float("nan"), float("inf"), True,
                                  None, [3], "1" * 30])
def test_bad_seed_is_refused_before_anything_opens(make_hub, seed):
    hub = make_hub()
    tab = hub.start("t", PROMPT, seed=5)
    sid, opened = tab.session.id, len(hub.engine.sessions)
    with pytest.raises(ValueError, match=r"^seed must be a whole number from 0 to 9223372036854775807, got "):
        hub.start("t", PROMPT, seed=seed)
    with pytest.raises(ValueError, match="seed must be"):
        hub.start("other", PROMPT, seed=seed)
    assert tab.session.id == sid and tab.session.status == "running" and len(hub.engine.sessions) == opened
    assert "other" not in hub.tabs


def test_good_seeds():
    from inferix.app.hub import SEED_MAX, parse_seed
    assert [parse_seed(v) for v in (0, 7.0, "42", " 8 ", np.int64(9), SEED_MAX)] == [0, 7, 42, 8, 9, SEED_MAX]


def test_largest_seed_streams(make_hub):
    from inferix.app.hub import SEED_MAX
    hub = make_hub()
    hub.start("t", PROMPT, seed=SEED_MAX)
    frames_grow(hub, "t", "frames with the largest seed")


def test_long_prompts_are_refused(make_hub):
    hub = make_hub(max_prompt_chars=50)
    with pytest.raises(ValueError, match=r"^the prompt has 51 characters; the limit is 50$"):
        hub.start("t", "x" * 51)
    assert "t" not in hub.tabs and not hub.engine.sessions
    tab = hub.start("t", "a" * 50)  # at the limit
    with pytest.raises(ValueError, match=r"^the prompt has 60 characters; the limit is 50$"):
        hub.set_prompt("t", "b" * 60)
    assert tab.session.prompt == "a" * 50 and tab.prompt == "a" * 50
    assert hub.set_prompt("t", " " + "c" * 50 + " ")  # measured without the spaces around it
    with pytest.raises(ValueError, match="the prompt must be text"):
        hub.start("t", 123)


# ---- limits -------------------------------------------------------------------------------------------------
def test_paused_stream_is_ended_and_freed_after_the_idle_timeout(make_hub):
    hub = make_hub(idle_timeout=0.8, snapshots=2, snapshot_every=1)
    tab = hub.start("p", PROMPT, seed=1)
    wait_until(lambda: hub.stats("p") and tab.snapshots and tab.frames, 10, "frames and a rewind point")
    t0 = time.monotonic()
    hub.toggle_pause("p")
    assert tab.session.status == "paused" and hub.engine.pages_in_use > 0
    video = hub.write_video("p")
    # the page keeps polling (stats), so the tab itself stays; only its paused stream ends
    wait_until(lambda: hub.stats("p")["status"] == "cancelled", 5, "the paused stream to end")
    assert time.monotonic() - t0 >= 0.8
    assert hub.engine.pages_in_use == 0 and hub.engine.stats()["kv_pages_in_use"] == 0
    assert tab.snapshots == [] and tab.frames == [] and not video.exists()
    assert "p" in hub.tabs and "was paused for over 0.8 s" in hub.stats("p")["message"]
    hub.start("p", PROMPT, seed=1)  # and a new stream starts as usual
    frames_grow(hub, "p", "a new stream after the timeout")
    assert hub.stats("p")["message"] == ""


def test_finished_stream_with_rewind_points_is_freed_after_the_idle_timeout(make_hub):
    hub = make_hub(idle_timeout=0.6, max_frames=48, snapshots=2, snapshot_every=1)
    tab = hub.start("f", PROMPT, seed=1)
    wait_until(lambda: hub.stats("f")["status"] == "finished", 10, "the stream to finish")
    assert tab.snapshots and hub.engine.pages_in_use > 0  # rewind points hold pages after the end
    wait_until(lambda: hub.stats("f") and hub.engine.pages_in_use == 0, 5, "the rewind points to be freed")
    assert tab.snapshots == [] and tab.frames == [] and "was idle for over 0.6 s" in hub.stats("f")["message"]


def test_unattended_tab_is_closed_and_its_memory_freed(make_hub):
    hub = make_hub(idle_timeout=0.8)
    gone = hub.start("gone", PROMPT, seed=1)  # like an API client: starts a stream and never polls
    wait_until(lambda: gone.frames, 5, "frames of the unattended tab")
    video = hub.write_video("gone")
    kept = hub.start("kept", PROMPT, seed=2)
    wait_until(lambda: hub.stats("kept") and "gone" not in hub.tabs, 5, "the unattended tab to be closed")
    assert gone.closed and gone.session.status == "cancelled" and gone.frames == [] and not video.exists()
    assert "kept" in hub.tabs and kept.session.status == "running"  # polled: it streams on
    hub.stop("kept")
    assert hub.engine.pages_in_use == 0


def test_start_is_refused_when_the_waiting_line_is_full(make_hub):
    from inferix.app.hub import AdmissionError
    hub = make_hub(max_sessions=1, max_queue=1)
    a = hub.start("a", PROMPT, seed=1)
    b = hub.start("b", PROMPT, seed=2)
    assert a.session.status == "running" and b.session.status == "waiting"
    opened = len(hub.engine.sessions)
    with pytest.raises(AdmissionError, match=r"^all streams are busy and 1 tab\(s\) wait already, the most allowed "
                                             r"to wait is 1: try again later$"):
        hub.start("c", PROMPT, seed=3)
    assert len(hub.engine.sessions) == opened and hub.tabs["c"].session is None
    hub.start("b", PROMPT, seed=2)  # a waiting tab may restart: its own place in line does not count
    assert hub.tabs["b"].session.status == "waiting"
    hub.stop("a")
    wait_until(lambda: hub.tabs["b"].session.status == "running", 5, "the waiting tab to run")
    assert hub.start("c", PROMPT, seed=3).session.status == "waiting"  # the line has room again


def test_no_waiting_line(make_hub):
    from inferix.app.hub import AdmissionError
    hub = make_hub(max_sessions=1, max_queue=0)
    hub.start("a", PROMPT, seed=1)
    with pytest.raises(AdmissionError, match="0 tab\\(s\\) wait already, the most allowed to wait is 0"):
        hub.start("b", PROMPT, seed=2)
    assert len(hub.engine.sessions) == 1


def test_recordings_of_all_tabs_are_capped_oldest_first(make_hub):
    hub = make_hub(max_frames=60, record_mib_total=0.15)  # 0.15 MiB of 32x32 frames: 51 frames
    cap = hub.record_total_cap
    assert cap == int(0.15 * 2 ** 20) // (32 * 32 * 3) == 51 and hub.record_cap > 60
    a = hub.start("a", PROMPT, seed=1)
    wait_until(lambda: a.session.status == "finished", 10, "stream a to finish")
    assert a.total_frames == 60 and len(a.frames) == cap and a.base == 60 - cap
    first = a.recorded()
    b = hub.start("b", PROMPT, seed=2)
    wait_until(lambda: b.session.status == "finished", 10, "stream b to finish")
    # b's frames are all newer than a's: a's go first, then b's own oldest
    assert len(a.frames) + len(b.frames) == cap
    assert a.frames == [] and b.total_frames == 60 and len(b.frames) == cap and b.base == 60 - cap
    assert len(a.frame_times) == 0 and len(b.frame_times) == cap
    assert first[-1].shape == (32, 32, 3)


def test_download_name_does_not_reveal_the_tab(make_hub):
    hub = make_hub(max_frames=24)
    key = "SessionHash0123abcd"
    tab = hub.start(key, PROMPT, seed=1)
    wait_until(lambda: tab.session.status == "finished", 10, "the stream to finish")
    first = hub.write_video(key)
    assert first.exists() and first.suffix == ".mp4" and first.name.startswith("inferix-")
    assert key.lower() not in str(first).lower()
    second = hub.write_video(key)  # a new random folder each time; the earlier download is removed
    assert second.exists() and second.parent != first.parent and not first.parent.exists()
    assert key.lower() not in str(second).lower()
    hub.close_tab(key)
    assert not second.exists() and not second.parent.exists()


# ---- pool sizing ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_frames", [12, 15])
def test_window_less_demo_pool_fits_its_streams(make_hub, max_frames):
    """--window 0: the pool is sized by the rule each session reserves by (these counts fell one block short)."""
    hub = make_hub(window=0, max_frames=max_frames, max_sessions=1)
    tab = hub.start("only", PROMPT, seed=0)
    wait_until(lambda: hub.stats("only") and tab.total_frames >= max_frames, 20, "the whole stream")
    assert tab.session.error is None and tab.total_frames == max_frames
