"""The demo's back end without a browser: a stream that reaches its frame limit, rewinding after it, Stop."""
from __future__ import annotations

import numpy as np
import pytest

from browser_utils import wait_until


def diff(a, b) -> np.ndarray:
    return np.abs(np.stack(a).astype(np.int16) - np.stack(b).astype(np.int16))


@pytest.fixture
def hub():
    from inferix.app.hub import DemoConfig, Hub
    h = Hub(DemoConfig(model="tiny", device="cpu", height=32, width=32, max_sessions=2, kv_pages=36,
                       max_frames=60, snapshots=2, snapshot_every=2))
    try:
        yield h
    finally:
        h.close()


def test_finish_rewind_and_stop(hub):
    tab = hub.start("t", "a cat runs in the snow", seed=3)
    wait_until(lambda: tab.session.status == "finished", 30, "the stream to reach its frame limit")
    # the engine's own pixel-to-latent rounding decides the exact count; it never exceeds the limit
    assert 0 < tab.total_frames <= 60 and tab.total_frames == tab.session.frames_out
    st = hub.stats("t")
    assert st["status"] == "finished" and st["frames"] == tab.total_frames and st["pixel_fps"] > 0
    # rewind points outlive the finished stream (they hold their pages) and can be resumed; none is taken
    # after the last block
    assert len(tab.snapshots) == 2 and tab.snapshots[-1].frames < tab.total_frames
    old = tab.recorded()
    first, second = tab.snapshots
    # branch at the older point with another prompt: the same frames up to it, different ones from then on
    hub.rewind("t", first.id)
    assert tab.session is first.session and tab.total_frames == first.frames
    assert second.session.status == "cancelled" and tab.snapshots == []  # it lay on the abandoned story
    assert hub.set_prompt("t", "a blue river under a green tree at night")
    wait_until(lambda: tab.session.status == "finished", 30, "the branch to finish")
    branch = tab.recorded()
    assert len(branch) == len(old)
    d = diff(branch, old)
    assert d[:first.frames].max() == 0
    assert d[first.frames + hub.block_pixels:].max() > 2 and d[first.frames + hub.block_pixels:].mean() > 0.05
    # rewinding without changes replays the branch: the fork continues exactly where the stream was
    assert len(tab.snapshots) == 1
    with pytest.raises(ValueError, match="is gone"):
        hub.rewind("t", second.id)
    snap = tab.snapshots[0]
    assert snap.prompt == "a blue river under a green tree at night" and snap.frames < len(branch)
    hub.rewind("t")  # default: the newest point
    assert tab.session is snap.session
    wait_until(lambda: tab.session.status == "finished", 30, "the replay to finish")
    assert diff(tab.recorded(), branch).max() <= 2
    with pytest.raises(ValueError, match="no rewind point yet"):  # none after the last block
        hub.rewind("t")
    hub.stop("t")
    assert hub.engine.pages_in_use == 0 and tab.snapshots == []
    path = hub.write_video("t")
    assert path.exists() and path.stat().st_size > 0
    hub.close_tab("t")
    assert "t" not in hub.tabs and not path.exists()


def test_act_rejects_unknown_action(hub):
    with pytest.raises(ValueError, match="unknown action 'jump'"):
        hub.act("t", "jump")
    hub.act("t", "left")
    assert hub.stats("t")["action"] == "left"


def test_default_prompt_is_the_models_own_unless_configured(hub):
    from inferix.app.hub import GENERIC_PROMPT, DemoConfig, Hub
    assert hub.default_prompt == GENERIC_PROMPT  # the tiny preset names none
    tab = hub.start("p", "", seed=1)
    assert tab.session.prompt == GENERIC_PROMPT
    hub.stop("p")
    for given, want in ((None, "a red cube in a snowy field"), ("a dark forest", "a dark forest")):
        h = Hub(DemoConfig(model="toyworld", device="cpu", max_sessions=1, default_prompt=given))
        try:
            assert h.engine.bundle.extra["default_prompt"] == "a red cube in a snowy field"
            assert h.default_prompt == want
        finally:
            h.close()


@pytest.mark.slow
def test_mirror_views_in_the_demo():
    """A hub built with mirror views streams with them. A rewind point (a fork) holds the stream's pages, with the
    views' lanes in them, so rewinding to it replays the very same frames; stopping frees every page."""
    from inferix.app.hub import DemoConfig, Hub
    h = Hub(DemoConfig(model="toyworld", device="cpu", max_sessions=4, max_frames=40, snapshots=3, snapshot_every=2,
                       mirrors=("hv", "d", "a")))
    try:
        assert h.engine.mirrors == ("hv", "d", "a")
        tab = h.start("m", "a cube in the desert", seed=2)
        wait_until(lambda: tab.session.status == "finished", 60, "the stream with views to finish")
        assert tab.total_frames == 40 and len(tab.snapshots) == 3
        first = tab.recorded()
        snap = tab.snapshots[0]  # the oldest: most of the stream comes after it
        assert h.engine.kv.sessions[snap.session.id].pages()  # it holds its pages (every lane) after the stream
        h.rewind("m", snap.id)
        wait_until(lambda: tab.session.status == "finished", 60, "the replay to finish")
        again = tab.recorded()
        # exactly: the replay runs alone in its batch as the stream did
        assert len(again) == 40 and diff(again, first).max() == 0
        h.stop("m")
        assert h.engine.pages_in_use == 0
    finally:
        h.close()
