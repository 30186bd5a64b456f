"""Host-memory tier: paused sessions move to host pages so waiting ones are admitted, and come back on resume."""
import numpy as np
import pytest
import torch

from inferix.engine import Engine
from inferix.models.bundle import load_model



def nf(eng):
    """Pixel frames of 4 blocks of 3 latent frames on the tiny preset (the 6-frame window rolls)."""
    return eng.bundle.pixel_frames(12)


def tiny(host_pages=12, frames=False):
    b = load_model("tiny")
    if not frames:
        b.decoder = None  # latents only: no decode time
    return Engine(b, window=6, max_sessions=2, host_pages=host_pages, keep_latents=True)


def alone(seed, frames=False):
    eng = tiny(0, frames)
    s = eng.open_session("a scene", num_frames=nf(eng), seed=seed, init_frames=None)
    eng.run_until_idle()
    return s


def run_blocks(eng, sessions, n):
    """Step until each session has n blocks committed (they run in lockstep: all stop at a block boundary)."""
    while min(s._s.block for s in sessions) < n:
        assert eng.step()
    assert all(s.at_block_boundary and s._s.block == n for s in sessions)


def assert_same(got, want):
    assert len(got.latents) == len(want.latents) == 4
    for g, w in zip(got.latents, want.latents):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def check_empty(eng):
    assert eng.kv.reserved == 0 and eng.pages_in_use == 0
    assert eng.host.pages_used == 0 and not eng.host.held
    assert eng.stats()["host_pages"]["used"] == 0


def test_pool_for_two_serves_four_with_pause_and_resume():
    eng = tiny()
    a, b = (eng.open_session("a scene", num_frames=nf(eng), seed=s, init_frames=None) for s in (1, 2))
    assert a._s.total_blocks == 4
    run_blocks(eng, [a, b], 2)
    a.pause(), b.pause()
    c, d = (eng.open_session("a scene", num_frames=nf(eng), seed=s, init_frames=None) for s in (3, 4))
    assert c.status == d.status == "running" and eng.waiting == 0
    assert a.offloaded and b.offloaded and a.status == b.status == "paused"
    assert eng.stats()["host_pages"]["used"] == 12 and eng.stats()["host_pages"]["total"] == 12
    run_blocks(eng, [c, d], 2)
    c.pause(), d.pause()
    a.resume(), b.resume()  # the host is full: each swaps places with c, d
    assert a.status == b.status == "running" and not a.offloaded and not b.offloaded
    assert c.offloaded and d.offloaded
    eng.run_until_idle()
    assert a.status == b.status == "finished"
    c.resume(), d.resume()
    eng.run_until_idle()
    assert c.status == d.status == "finished"
    for s, seed in ((a, 1), (b, 2), (c, 3), (d, 4)):
        assert_same(s, alone(seed))
    check_empty(eng)
    assert eng.stats()["host_pages"]["moved_out"] == 4 and eng.stats()["host_pages"]["moved_in"] == 4


def test_frames_after_coming_back_equal_a_lone_run():
    eng = tiny(6, frames=True)
    a = eng.open_session("a scene", num_frames=nf(eng), seed=5, init_frames=None)
    run_blocks(eng, [a], 2)
    a.pause()
    b, c = (eng.open_session("a scene", num_frames=nf(eng), seed=s, init_frames=None) for s in (6, 7))
    assert a.offloaded and b.status == c.status == "running"
    run_blocks(eng, [b, c], 1)
    b.pause(), c.pause()
    a.resume()  # swaps places with b; runs alone, as in its own engine: bit for bit
    assert a.status == "running" and b.offloaded and not c.offloaded
    eng.run_until_idle()
    want = alone(5, frames=True)
    assert_same(a, want)
    np.testing.assert_array_equal(np.concatenate(a.poll()), np.concatenate(want.poll()))
    b.cancel(), c.cancel()
    check_empty(eng)


def test_host_full_or_session_mid_block_means_waiting():
    eng = tiny(6)
    a, b = (eng.open_session("a scene", num_frames=nf(eng), seed=s, init_frames=None) for s in (1, 2))
    run_blocks(eng, [a, b], 2)
    a.pause(), b.pause()
    c = eng.open_session("a scene", num_frames=nf(eng), seed=3, init_frames=None)
    d = eng.open_session("a scene", num_frames=nf(eng), seed=4, init_frames=None)  # no host room for b: d waits
    assert a.offloaded and not b.offloaded and c.status == "running"
    assert d.status == "waiting" and d.waiting_position == 0
    eng.step()  # c starts a block; pausing it mid-block does not move it
    c.pause()
    assert not c.at_block_boundary and not c.offloaded and d.status == "waiting"
    a.resume()  # waits behind d
    assert a.status == "waiting" and a.waiting_position == 1 and a.offloaded
    a.pause()  # leaves the queue, stays on the host
    assert a.status == "paused" and eng.waiting == 1 and a.offloaded
    with pytest.raises(RuntimeError, match="host memory"):
        a.fork()
    for s in (a, b, c, d):
        s.cancel()
    check_empty(eng)


def test_shared_pages_stay_on_the_device():
    eng = tiny(12)
    a = eng.open_session("a scene", num_frames=nf(eng), seed=1, init_frames=None)
    run_blocks(eng, [a], 2)
    a.pause()
    f = a.fork()  # shares a's pages: neither moves
    c = eng.open_session("a scene", num_frames=nf(eng), seed=3, init_frames=None)
    assert c.status == "waiting" and not a.offloaded and not f.offloaded
    for s in (a, f, c):
        s.cancel()
    check_empty(eng)


def test_off_by_default_and_bad_values():
    eng = tiny(0)
    assert eng.host is None and "host_pages" not in eng.stats()
    a, b = (eng.open_session("a scene", num_frames=nf(eng), seed=s, init_frames=None) for s in (1, 2))
    run_blocks(eng, [a, b], 1)
    a.pause()
    c = eng.open_session("a scene", num_frames=nf(eng), seed=3, init_frames=None)
    assert c.status == "waiting" and not a.offloaded
    a.resume()
    assert a.status == "running"
    for bad in (-1, 1.5, True, None, "4"):
        with pytest.raises(ValueError, match=r"^host_pages must be an int >= 0"):
            tiny(bad)


def test_restore_makes_room_like_admission(tmp_path):
    """Engine.restore frees room the way a new session gets it: a paused session moves to host memory."""
    src = tiny(0)
    s = src.open_session("a scene", num_frames=nf(src), seed=5, init_frames=None)
    run_blocks(src, [s], 2)
    path = tmp_path / "s.safetensors"
    s.snapshot(path)
    src.run_until_idle()
    eng = tiny()
    a, b = (eng.open_session("a scene", num_frames=nf(eng), seed=x, init_frames=None) for x in (1, 2))
    run_blocks(eng, [a, b], 1)
    a.pause()
    r = eng.restore(path)  # the pool is full: a moves to the host to make room
    assert a.offloaded and not r.offloaded and r.status == "paused"
    r.resume()
    eng.run_until_idle()
    assert len(r.latents) == 2  # batched with b here, alone before: equal to float rounding
    for x, y in zip(r.latents, s.latents[2:]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    a.cancel(), b.cancel(), r.cancel()
    check_empty(eng)
