"""``inferix.client`` against a real ``inferix serve`` process of the toy world (the ``server`` fixture)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from inferix.client import Client, ServerError

PROMPT = "a sunny meadow"


@pytest.fixture
def client(server):
    with Client(server, timeout=30) as c:
        yield c


def _client_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("inferix-client")]


def _take(it, n: int) -> list:
    out = []
    for x in it:
        out.append(x)
        if len(out) == n:
            break
    return out


def _read_until_block(s, block: int, limit: int = 40) -> dict:
    """Read frames until the first frame of ``block`` (at most ``limit`` frames); its block event."""
    for i, (ev, frame) in enumerate(s.frames(timeout=30, with_block=True)):
        if ev is not None and ev["block"] >= block:
            return ev
        assert i < limit, f"block {block} did not come in {limit} frames"
    raise AssertionError(f"the stream ended before block {block}")


def test_health_and_model(client):
    h = client.health()
    assert h["status"] == "ok" and h["kv_pages_total"] > 0
    m = client.model()
    assert (m["height"], m["width"], m["fps"], m["block_pixel_frames"]) == (64, 64, 16, 4)
    assert {"none", "up", "down", "left", "right"} <= set(m["actions"]["values"])
    assert set(m["video"]) >= {"jpeg", "fmp4"}
    assert "inferix_kv_pages_used" in client.metrics()


@pytest.mark.parametrize("video", ["jpeg", "fmp4"])
def test_finite_session_frames(client, pages_free, video):
    with client.open(PROMPT, seed=1, num_frames=12, video=video) as s:
        assert s.id and s.token and s.state in ("running", "waiting")
        frames = list(s.frames(timeout=30))
        assert len(frames) == 12
        assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)
        assert s.media["video"] == video and s.end["reason"] == "finished" and s.state == "finished"
        kinds = [e["type"] for e in s.events]
        assert "media" in kinds and kinds.index("media") < kinds.index("block") and kinds.count("block") == 3
        blocks = [e for e in s.events if e["type"] == "block"]
        assert [b["frames"] for b in blocks] == [[0, 4], [4, 8], [8, 12]]
    assert not _client_threads()
    assert pages_free(client)["kv_pages_used"] == 0


@pytest.mark.parametrize("video", ["jpeg", "fmp4"])
def test_live_blocks_first_frame_early(client, pages_free, video):
    """A live session never ends by itself: its first frame must come while it runs (fMP4 decoded fragment
    by fragment, not at the end of the stream), and blocks come as [4, 64, 64, 3] arrays in order."""
    with client.open(PROMPT, seed=2, video=video) as s:
        t0 = time.monotonic()
        first = next(iter(s))
        assert first.shape == (64, 64, 3) and time.monotonic() - t0 < 30
        assert s.end is None
        got = _take(s.blocks(timeout=30), 4)[1:]  # the first one is the rest of the first frame's block
        assert got[0][0]["block"] >= 1
        assert all(b.shape == (4, 64, 64, 3) and b.dtype == np.uint8 for _, b in got)
        idx = [ev["block"] for ev, _ in got]
        assert idx == sorted(idx) and len(set(idx)) == 3
        assert s.info()["state"] == "running"
    assert s.state == "cancelled"
    assert not _client_threads()
    assert pages_free(client)["kv_pages_used"] == 0


def test_act_prompt_pause_resume(client, pages_free):
    with client.open(PROMPT, seed=3, video="jpeg") as s:
        ev = _read_until_block(s, 0)
        current = s.block
        seq = s.act("left")
        assert isinstance(seq, int)
        applied = s.wait_applied(seq, timeout=30)
        assert isinstance(applied, int) and applied >= current >= ev["block"]
        assert s.applied_block(seq) == applied
        assert _read_until_block(s, applied)["block"] == applied
        assert any(e["type"] == "ack" and e["seq"] == seq for e in s.events)

        seq = s.set_prompt("a snowy night")
        assert s.wait_applied(seq, timeout=30) >= applied
        assert s.info()["prompt"] == "a snowy night"

        seq = s.pause()
        paused_at = s.wait_applied(seq, timeout=30)
        deadline = time.monotonic() + 10
        while s.info()["state"] != "paused":
            assert time.monotonic() < deadline, "the session did not pause"
            time.sleep(0.05)
        last = s.info()["block"]
        time.sleep(0.5)
        assert s.info()["block"] == last, "a paused session made blocks"
        seq = s.resume()
        resumed_at = s.wait_applied(seq, timeout=30)
        assert resumed_at >= paused_at
        _read_until_block(s, last + 1)
        assert s.state == "running"
    assert pages_free(client)["kv_pages_used"] == 0


def test_fork_is_a_second_stream(client, pages_free):
    with client.open(PROMPT, seed=4, video="jpeg") as s:
        _read_until_block(s, 1)
        f = s.fork()  # over the socket
        assert f.id != s.id and f.token != s.token and f.state == "paused"
        with f:
            f.resume()
            ff = _take(f.frames(timeout=30, with_block=True), 6)
            assert all(fr.shape == (64, 64, 3) for _, fr in ff)
            assert f.info()["state"] == "running" and f.info()["id"] == f.id
            assert _read_until_block(s, s.block + 1)  # the parent goes on
        assert f.state == "cancelled"
        more = _take(s.frames(timeout=30), 4)  # and goes on after its fork closed
        assert len(more) == 4
    # fork over HTTP, from a session with no socket
    with client.open(PROMPT, seed=5, video="fmp4") as s2:
        f2 = s2.fork()
        assert f2.id != s2.id and f2.state == "paused"
        f2.close()  # DELETE
    assert not _client_threads()
    assert pages_free(client)["kv_pages_used"] == 0


def test_reattach_takes_over(client, pages_free):
    s = client.open(PROMPT, seed=6, video="jpeg")
    try:
        first = _take(s.frames(timeout=30), 2)
        assert len(first) == 2
        again = client.session(s.id, s.token)
        assert again.state == "running"
        assert len(_take(again.frames(timeout=30), 4)) == 4
        with pytest.raises(ServerError) as e:
            for _ in s.frames(timeout=30):
                pass
        assert e.value.code == "replaced"
        again.close()
    finally:
        s.disconnect()
    assert s.info()["state"] == "cancelled"
    assert pages_free(client)["kv_pages_used"] == 0


def test_close_over_http_frees_pages(client, pages_free):
    s = client.open(PROMPT, seed=7, video="jpeg")
    assert client.health()["sessions"] >= 1
    s.close()  # never connected: DELETE
    assert s.state == "cancelled"
    assert s.info()["state"] == "cancelled"
    s.close()  # again: nothing to do
    assert pages_free(client)["kv_pages_used"] == 0


def test_server_errors(client, pages_free):
    with client.open(PROMPT, seed=8, video="jpeg") as s:
        with pytest.raises(ServerError) as e:
            client.session(s.id, "0" * 64)
        assert e.value.status == 403 and e.value.message
        with pytest.raises(ServerError) as e:
            client.session("no-such-session", s.token)
        assert e.value.status == 404
        from inferix.client import RemoteSession
        with pytest.raises(ServerError) as e:  # the WebSocket with a wrong token
            RemoteSession(client, {"id": s.id, "token": "0" * 64}).connect()
        assert e.value.status == 403
        seq = s.act("jump")
        with pytest.raises(ServerError) as e:
            s.wait_applied(seq, timeout=30)
        assert e.value.code == "bad_value" and e.value.status is None and "jump" in e.value.message
        assert len(_take(s.frames(timeout=30), 2)) == 2  # the session goes on
    with pytest.raises(ServerError) as e:
        client.open(PROMPT, num_frames=-4)
    assert 400 <= e.value.status < 500 and e.value.code
    with pytest.raises(ServerError) as e:
        client.open(PROMPT, image=np.zeros((8, 8, 3), np.uint8))  # not the engine's size
    assert 400 <= e.value.status < 500
    with Client(client.base_url + "/nothing-here", timeout=5) as bad:
        with pytest.raises(ServerError) as e:
            bad.health()
        assert e.value.status == 404
    assert pages_free(client)["kv_pages_used"] == 0


def test_frames_match_in_process_engine(client, pages_free):
    """The first frames of a jpeg and an fmp4 session of the same prompt and seed are close to each other and
    to the in-process engine's (a naive reference: JPEG / H.264 losses only)."""
    import inferix
    n, seed = 12, 11  # 3 blocks: more than --max-ahead, so the session cannot end before its socket opens
    got = {}
    for video in ("jpeg", "fmp4"):
        with client.open(PROMPT, seed=seed, num_frames=n, video=video) as s:
            got[video] = np.stack(list(s.frames(timeout=30))).astype(np.float32)
    eng = inferix.Engine.from_pretrained("toyworld", device="cpu")
    ref = np.concatenate(list(eng.generate(PROMPT, num_frames=n, seed=seed))).astype(np.float32)
    other = np.concatenate(list(eng.generate("a snowy night", num_frames=n, seed=seed + 1))).astype(np.float32)
    assert got["jpeg"].shape == got["fmp4"].shape == ref.shape == (n, 64, 64, 3)
    d_codecs = np.abs(got["jpeg"][0] - got["fmp4"][0]).mean()
    d_jpeg = np.abs(got["jpeg"][0] - ref[0]).mean()
    d_fmp4 = np.abs(got["fmp4"][0] - ref[0]).mean()
    d_all = np.abs(got["jpeg"] - ref).mean()
    d_other = np.abs(other[0] - ref[0]).mean()
    print(f"mean abs diff: jpeg-fmp4 {d_codecs:.2f} jpeg-ref {d_jpeg:.2f} fmp4-ref {d_fmp4:.2f} "
          f"jpeg-ref (all) {d_all:.2f}; another prompt and seed {d_other:.2f}")
    assert d_codecs < 8 and d_jpeg < 8 and d_fmp4 < 8 and d_all < 8
    assert d_other > 3 * max(d_jpeg, d_fmp4)  # the check tells different videos apart
    assert pages_free(client)["kv_pages_used"] == 0


def test_image_start_frame(client, pages_free):
    img = np.full((64, 64, 3), 200, np.uint8)
    with client.open(PROMPT, seed=9, num_frames=12, image=img, video="jpeg") as s:
        frames = list(s.frames(timeout=30))
        assert frames and frames[0].shape == (64, 64, 3)
    assert pages_free(client)["kv_pages_used"] == 0


def test_fmp4_decoded_fragment_by_fragment():
    """The fMP4 decode thread hands out each frame as soon as its fragment is in (no probing, no waiting for
    the end of the stream), and ends when the stream does."""
    from inferix.app.serve_media import FMP4Encoder
    from inferix.client import RemoteSession

    enc = FMP4Encoder(64, 64, 16)
    rng = np.random.default_rng(0)
    s = RemoteSession(None, {"id": "local", "token": "-"}, video="fmp4")
    s._reader = threading.current_thread()  # stands in for the socket's reader
    sent = 0
    for k in range(4):
        s._on_event('{"type": "block", "block": %d, "frames": [%d, %d]}' % (k, 4 * k, 4 * k + 4))
        for piece in enc.encode(rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)):
            s._on_video(piece)
        sent += 4
        deadline = time.monotonic() + 10
        while s._frames.qsize() < sent:
            assert time.monotonic() < deadline, f"{s._frames.qsize()} of {sent} frames decoded while streaming"
            time.sleep(0.01)
    s._on_event('{"type": "end", "reason": "finished", "frames": 16}')
    s._pipe.end()  # the socket closed
    s._decoder.join(10)
    assert not s._decoder.is_alive() and s._done.is_set()
    got = list(s.frames(timeout=5, with_block=True))
    assert len(got) == 16 and all(f.shape == (64, 64, 3) for _, f in got)
    assert [ev["block"] for ev, _ in got] == [k for k in range(4) for _ in range(4)]


def test_api_key(tmp_path):
    """With --api-key: HTTP carries the Bearer header and the WebSocket ?key=; a missing key gets 401."""
    from inferix.bench_serve import start_server, stop_server
    key = "k-" + "3" * 40
    with open(tmp_path / "server.log", "wb") as log:
        proc, url = start_server("toyworld", ["--max-sessions", "1", "--idle-timeout", "30"], timeout=120,
                                 api_key=key, log=log)
        try:
            with Client(url, timeout=10) as anon:
                with pytest.raises(ServerError) as e:
                    anon.health()
                assert e.value.status == 401
            with Client(url, api_key=key, timeout=30) as c:
                assert c.health()["status"] == "ok"
                with c.open(PROMPT, num_frames=12, video="fmp4") as s:
                    assert len(list(s.frames(timeout=30))) == 12
                assert c.health()["kv_pages_used"] == 0
        finally:
            stop_server(proc)


def test_client_close_leaves_no_thread_or_socket(server, pages_free):
    c = Client(server, timeout=30)
    s = c.open(PROMPT, seed=12, video="fmp4")
    assert len(_take(s.frames(timeout=30), 3)) == 3 and _client_threads()
    c.close()  # disconnects the socket; the session itself stays until closed or idle
    assert not _client_threads()
    with Client(server, timeout=30) as c2:
        again = c2.session(s.id, s.token)
        assert again.info()["clients"] == 0
        again.close()  # not connected: DELETE
        assert pages_free(c2)["kv_pages_used"] == 0


def test_snapshot_and_continue(client, pages_free):
    with client.open(PROMPT, seed=13, video="jpeg") as s:
        snap_http = s.snapshot()  # no socket yet: HTTP
        assert snap_http["snapshot"] and snap_http["bytes"] > 0
        _read_until_block(s, 1)
        snap = s.snapshot()  # over the socket
        assert snap["snapshot"] and snap["block"] >= 1 and snap["frame"] == 4 * snap["block"]
    with pytest.raises(ValueError):
        client.open(PROMPT, snapshot=snap["snapshot"])
    with client.open(snapshot=snap["snapshot"], video="fmp4") as r:  # a live session goes on live
        ev, block = next(r.blocks(timeout=30))
        assert block.shape == (4, 64, 64, 3) and ev["frames"][0] >= snap["frame"]
    assert pages_free(client)["kv_pages_used"] == 0


def test_short_session_finished_before_connect_still_delivers(client, pages_free):
    with client.open(PROMPT, seed=14, num_frames=4, video="jpeg") as s:
        deadline = time.monotonic() + 20
        while s.info()["state"] != "finished":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert len(list(s.frames(timeout=30))) == 4
