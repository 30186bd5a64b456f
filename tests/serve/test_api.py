"""``inferix serve`` end to end: a real server process on 127.0.0.1, real HTTP and WebSocket clients.

Covers the HTTP routes, WebSocket control and video, backpressure, the admission queue (8 clients on a pool for 4),
credentials, limits and bad input, idle reaping, killed clients, fork and snapshots, and SIGTERM.
"""
from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image
from server_proc import ServerProcess
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

PROMPT = "a red cube in a snowy field"


@pytest.fixture(scope="module")
def srv():
    # a pool for 4 live sessions; small limits so the tests can cross them
    with ServerProcess("--max-sessions", "4", "--max-queue", "4", "--idle-timeout", "30", "--max-message-kib", "4",
                       "--max-body-kib", "64", "--max-frames", "400", "--max-prompt-chars", "200") as s:
        yield s


class Conn:
    """A WebSocket client of one session: JSON events and binary video, with bounded waits."""

    def __init__(self, srv, sess, query: str = ""):
        self.ws = connect(f"{srv.ws_url}/v1/sessions/{sess['id']}/ws?token={sess['token']}{query}",
                          open_timeout=10, close_timeout=5).__enter__()  # closed by close() or the server
        self.events: list = []
        self.binary: list = []  # (block index or None, bytes)
        self.block = None
        self.closed = None

    def recv(self, timeout: float = 20):
        m = self.ws.recv(timeout=timeout)
        if isinstance(m, bytes):
            self.binary.append((self.block, m))
            return m
        e = json.loads(m)
        self.events.append(e)
        if e["type"] == "block":
            self.block = e["block"]
        return e

    def until(self, pred, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching event within {timeout} s; last events: {self.events[-6:]}")
            try:
                m = self.recv(left)
            except ConnectionClosed as e:
                self.closed = e
                raise AssertionError(f"connection closed ({e}); last events: {self.events[-6:]}") from None
            if isinstance(m, dict) and pred(m):
                return m

    def event(self, kind: str, timeout: float = 30, **match):
        return self.until(lambda e: e["type"] == kind and all(e.get(k) == v for k, v in match.items()), timeout)

    def seen(self, kind: str, timeout: float = 30, **match):
        """Like event(), but an event received already counts (for events that may come in either order)."""
        for e in self.events:
            if e["type"] == kind and all(e.get(k) == v for k, v in match.items()):
                return e
        return self.event(kind, timeout, **match)

    def send(self, **msg):
        self.ws.send(json.dumps(msg))

    def blocks(self):
        return [e for e in self.events if e["type"] == "block"]

    def close(self):
        self.ws.close()


def open_session(srv, **body):
    if "snapshot" not in body:
        body.setdefault("prompt", PROMPT)
    status, r = srv.request("POST", "/v1/sessions", body)
    assert status in (201, 202), (status, r)
    return r


def jpeg_frames(conn) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(b))) for _, b in conn.binary])


def pages_back_to_zero(srv, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = srv.get("/v1/health")
        if h["kv_pages_used"] == 0 or time.monotonic() > deadline:
            return h
        time.sleep(0.1)


def delete(srv, sess):
    status, r = srv.request("DELETE", f"/v1/sessions/{sess['id']}", token=sess["token"])
    assert status == 200, r


# ---- HTTP ----------------------------------------------------------------------------------------------------
def test_health_model_and_session_lifecycle(srv):
    h = srv.get("/v1/health")
    assert h["status"] == "ok" and h["kv_pages_total"] > 0
    m = srv.get("/v1/model")
    assert (m["height"], m["width"], m["fps"]) == (64, 64, 16)
    assert m["actions"] == {"type": "discrete", "values": ["none", "up", "down", "left", "right"]}
    assert set(m["video"]) == {"fmp4", "jpeg"}

    s = open_session(srv, seed=3, video="jpeg")
    assert s["state"] == "running" and len(s["token"]) >= 40 and s["id"] != s["token"]
    # another client cannot read or control it: no token, a wrong token, an unknown id
    assert srv.request("GET", f"/v1/sessions/{s['id']}")[0] == 403
    assert srv.request("GET", f"/v1/sessions/{s['id']}", token=s["token"][:-1] + "x")[0] == 403
    assert srv.request("DELETE", f"/v1/sessions/{s['id']}", token="guess")[0] == 403
    assert srv.request("GET", "/v1/sessions/nosuchsession", token=s["token"])[0] == 404
    # with no client it runs max_ahead (2) blocks, then holds still (backpressure)
    deadline = time.monotonic() + 20
    while (st := srv.get(f"/v1/sessions/{s['id']}", token=s["token"]))["frames"] < 8:
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    time.sleep(1.0)
    st = srv.get(f"/v1/sessions/{s['id']}", token=s["token"])
    assert st["frames"] == 8 and st["block"] == 2 and st["throttled"] and st["state"] == "running", st
    assert st["pages"] > 0 and st["metrics"]["time_to_first_frame_s"] > 0
    assert srv.get("/v1/health")["kv_pages_used"] == st["pages"]
    delete(srv, s)
    assert srv.get(f"/v1/sessions/{s['id']}", token=s["token"])["state"] == "cancelled"
    assert pages_back_to_zero(srv)["kv_pages_used"] == 0


def test_metrics_are_prometheus_text(srv):
    from prometheus_client.parser import text_string_to_metric_families
    s = open_session(srv, video="jpeg")
    c = Conn(srv, s)
    c.event("block")
    c.event("block")
    fams = {f.name: f for f in text_string_to_metric_families(srv.get("/metrics").decode())}
    for name in ("inferix_sessions", "inferix_sessions_waiting", "inferix_kv_pages_used", "inferix_kv_pages_total",
                 "inferix_blocks", "inferix_frames", "inferix_frames_per_second", "inferix_blocks_per_second",
                 "inferix_time_to_first_frame_seconds", "inferix_block_latency_seconds",
                 "inferix_control_latency_seconds"):
        assert name in fams, name
    running = [x.value for x in fams["inferix_sessions"].samples if x.labels.get("state") == "running"]
    assert running == [1.0]
    assert [x.value for x in fams["inferix_kv_pages_used"].samples][0] > 0
    ttff = {x.name: x.value for x in fams["inferix_time_to_first_frame_seconds"].samples}
    assert ttff["inferix_time_to_first_frame_seconds_count"] >= 1
    c.send(type="close")
    c.event("end", reason="cancelled")
    assert pages_back_to_zero(srv)["kv_pages_used"] == 0


def test_bad_http_requests_get_clear_errors(srv):
    def err(status_body, status, code, text):
        st, body = status_body
        assert st == status, (st, body)
        assert body["error"]["code"] == code and text in body["error"]["message"], body

    err(srv.request("POST", "/v1/sessions", raw=b"{not json", headers={"Content-Type": "application/json"}),
        400, "bad_json", "not valid JSON")
    err(srv.request("POST", "/v1/sessions", {"prompt": PROMPT, "colour": 1}), 400, "bad_value", "colour")
    err(srv.request("POST", "/v1/sessions", {"video": "gif"}), 400, "bad_value", "video must be one of")
    err(srv.request("POST", "/v1/sessions", {"num_frames": 401}), 400, "bad_value", "1..400")
    err(srv.request("POST", "/v1/sessions", {"num_frames": "ten"}), 400, "bad_value", "num_frames")
    err(srv.request("POST", "/v1/sessions", {"seed": -1}), 400, "bad_value", "seed")
    err(srv.request("POST", "/v1/sessions", {"prompt": "x" * 201}), 400, "too_large", "limit is 200")
    err(srv.request("POST", "/v1/sessions", {"action": "jump"}), 400, "bad_value", "jump")
    err(srv.request("POST", "/v1/sessions", {"image": "@@@"}), 400, "bad_value", "base64")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(buf, "PNG")
    err(srv.request("POST", "/v1/sessions", {"image": base64.b64encode(buf.getvalue()).decode()}), 400,
        "bad_value", "48x32")
    err(srv.request("POST", "/v1/sessions", raw=b"{" + b" " * 70000 + b"}",
                    headers={"Content-Type": "application/json"}), 413, "too_large", "max-body-kib")
    err(srv.request("POST", "/v1/sessions", {"snapshot": "nope"}), 404, "not_found", "snapshot")
    err(srv.request("PUT", "/v1/snapshots", raw=b"not a snapshot"), 400, "bad_value", "not a snapshot")
    # nothing was left behind
    h = srv.get("/v1/health")
    assert h["kv_pages_used"] == 0 and h["sessions"] == 0, h


def test_start_image(srv):
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = (200, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    s = open_session(srv, image=base64.b64encode(buf.getvalue()).decode(), num_frames=8, video="jpeg")
    c = Conn(srv, s)
    c.event("end", reason="finished")
    frames = jpeg_frames(c)
    assert frames.shape == (8, 64, 64, 3)
    assert pages_back_to_zero(srv)["kv_pages_used"] == 0


# ---- WebSocket -----------------------------------------------------------------------------------------------
def test_websocket_video_controls_fork(srv):
    s = open_session(srv, seed=1, video="jpeg")
    c = Conn(srv, s)
    first = c.event("block")
    assert first["frames"] == [0, 4] and first["block"] == 0
    c.send(type="act", action="left", seq=1)
    c.event("ack", seq=1)
    applied = c.seen("applied", seq=1)
    assert applied["block"] >= 1
    # the backpressure bound: an action applies within max_ahead + 1 blocks of the last block received
    assert applied["block"] <= c.block + 3
    c.event("block", block=applied["block"])
    c.send(type="prompt", prompt="a blue cube on green grass", seq=2)
    c.event("ack", seq=2)
    c.seen("applied", seq=2)
    st = srv.get(f"/v1/sessions/{s['id']}", token=s["token"])
    assert st["prompt"] == "a blue cube on green grass" and st["action"] == "left"
    # pause at the next block boundary: no block after the one it applies at
    c.send(type="pause", seq=3)
    paused_at = c.seen("applied", seq=3)["block"]
    c.seen("state", paused=True)
    t_end = time.monotonic() + 1.0
    while time.monotonic() < t_end:
        try:
            c.recv(timeout=max(0.01, t_end - time.monotonic()))
        except TimeoutError:
            break
    assert all(b["block"] < paused_at for b in c.blocks()), (paused_at, c.blocks()[-1])
    c.send(type="resume", seq=4)
    c.seen("applied", seq=4)
    c.event("block", block=paused_at)
    # frame ranges are contiguous, each block's 4 JPEGs arrive after its event
    blocks = c.blocks()
    assert [b["frames"][0] for b in blocks[1:]] == [b["frames"][1] for b in blocks[:-1]]
    n = blocks[-1]["frames"][1]
    c.event("block")  # the last block's images are in
    imgs = jpeg_frames(c)
    assert imgs.shape[1:] == (64, 64, 3) and len(imgs) >= n
    # fork over the socket: a paused copy at the next boundary, with its own token
    c.send(type="fork", seq=5)
    f = c.event("forked", seq=5)
    assert f["id"] != s["id"] and f["token"] != s["token"] and f["state"] == "paused"
    assert srv.request("GET", f"/v1/sessions/{f['id']}", token=s["token"])[0] == 403
    fc = Conn(srv, f)
    fc.seen("state", paused=True)
    fc.send(type="resume", seq=1)
    fb = fc.event("block")
    assert fb["frames"][0] == f["frame"] and fb["block"] == f["block"]
    fc.send(type="close", seq=2)
    fc.event("end", reason="cancelled")
    c.send(type="close", seq=6)
    c.event("end", reason="cancelled")
    assert pages_back_to_zero(srv)["kv_pages_used"] == 0


def test_fork_continues_like_its_parent(srv):
    """Parent and fork continue from the same state with the same action: the same frames (JPEG-close)."""
    s = open_session(srv, seed=7, video="jpeg")
    status, f = srv.request("POST", f"/v1/sessions/{s['id']}/fork", token=s["token"])
    assert status == 201, f
    out = {}
    for name, sess in (("parent", s), ("fork", f)):
        c = Conn(srv, sess)
        if name == "fork":
            c.send(type="resume")
        c.until(lambda e: e["type"] == "block" and e["frames"][0] >= f["frame"] + 8)
        c.event("block")
        got = [b for blk, b in c.binary if blk is not None]
        starts = {e["block"]: e["frames"][0] for e in c.blocks()}
        frames = {}
        i = 0
        for blk, b in c.binary:
            frames.setdefault(blk, []).append(b)
        out[name] = np.concatenate([np.stack([np.asarray(Image.open(io.BytesIO(x))) for x in frames[blk]])
                                    for blk in sorted(frames) if starts[blk] >= f["frame"]][:2])
        assert got
        c.send(type="close")
        c.event("end")
        i += 1
    diff = np.abs(out["parent"].astype(int) - out["fork"].astype(int)).mean()
    assert diff < 2.0, diff
    assert pages_back_to_zero(srv)["kv_pages_used"] == 0


def test_fmp4_stream_decodes(srv):
    import av
    s = open_session(srv, seed=2, num_frames=16, video="fmp4")
    c = Conn(srv, s)
    media = c.event("media")
    assert media["codec"].startswith("avc1.") and "video/mp4" in media["mime"]
    c.event("end", reason="finished")
    data = b"".join(b for _, b in c.binary)
    assert c.binary[0][1][4:8] == b"ftyp" and all(b[4:8] == b"moof" for _, b in c.binary[1:])
    with av.open(io.BytesIO(data)) as f:
        frames = [x.to_ndarray(format="rgb24") for x in f.decode(video=0)]
    assert len(frames) == 16 and frames[0].shape == (64, 64, 3)
    assert np.std(np.stack(frames)) > 5  # a picture, not a blank


def test_bad_websocket_messages_never_take_the_server_down(srv):
    s = open_session(srv, video="jpeg")
    c = Conn(srv, s)
    c.ws.send("{oops")
    assert c.event("error")["code"] == "bad_json"
    c.send(type="teleport", seq=9)
    e = c.event("error")
    assert e["code"] == "unknown_type" and e["seq"] == 9 and "teleport" in e["message"]
    c.ws.send(b"\x00\x01")
    assert c.event("error")["code"] == "bad_message"
    c.ws.send("[1, 2]")
    assert c.event("error")["code"] == "bad_message"
    c.send(type="act", action="jump", seq=10)
    e = c.event("error", seq=10)
    assert e["code"] == "bad_value" and "jump" in e["message"]
    c.send(type="prompt", prompt="", seq=11)
    assert c.event("error", seq=11)["code"] == "bad_value"
    c.send(type="act", action="up", seq="x")
    assert c.event("error")["code"] == "bad_message"
    c.send(type="prompt", prompt="y" * 6000, seq=12)  # over --max-message-kib 4
    e = c.event("error")
    assert e["code"] == "too_large" and "max-message-kib" in e["message"]
    # still served: a good control is acknowledged
    c.send(type="act", action="up", seq=13)
    c.event("ack", seq=13)
    # a huge message closes only this connection (the transport's limit); the session and server go on
    with pytest.raises((ConnectionClosed, AssertionError)):
        c.ws.send("z" * 200_000)
        c.until(lambda e: False, timeout=10)
    assert srv.get("/v1/health")["status"] == "ok"
    c2 = Conn(srv, s)  # the session is still there: a new connection takes it
    c2.event("block")
    c2.send(type="close")
    c2.event("end")
    assert pages_back_to_zero(srv)["kv_pages_used"] == 0


def test_a_second_connection_takes_over(srv):
    s = open_session(srv, video="jpeg")
    a = Conn(srv, s)
    a.event("block")
    b = Conn(srv, s)
    assert a.event("end")["reason"] == "replaced"
    b.event("block")
    b.send(type="close")
    b.event("end", reason="cancelled")
    assert pages_back_to_zero(srv)["kv_pages_used"] == 0


def test_killed_client_leaves_the_session_for_the_next_one(srv):
    s = open_session(srv, video="jpeg")
    code = ("import sys, json, time\n"
            "from websockets.sync.client import connect\n"
            f"ws = connect({srv.ws_url + '/v1/sessions/' + s['id'] + '/ws?token=' + s['token']!r})\n"
            "n = 0\n"
            "while n < 3:\n"
            "    m = ws.recv(timeout=20)\n"
            "    n += isinstance(m, str) and json.loads(m)['type'] == 'block'\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.kill()  # mid-stream, no close frame
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    deadline = time.monotonic() + 10
    while srv.get(f"/v1/sessions/{s['id']}", token=s["token"])["clients"]:
        assert time.monotonic() < deadline, "the server never noticed the killed client"
        time.sleep(0.1)
    c = Conn(srv, s)
    blk = c.event("block")
    assert blk["block"] >= 3
    c.send(type="close")
    c.event("end")
    assert pages_back_to_zero(srv)["kv_pages_used"] == 0


def test_eight_clients_on_a_pool_for_four(srv):
    sessions = [open_session(srv, seed=i, video="jpeg") for i in range(8)]
    states = [s["state"] for s in sessions]
    assert states.count("running") == 4 and states.count("waiting") == 4, states
    assert sorted(s["position"] for s in sessions if s["state"] == "waiting") == [0, 1, 2, 3]
    # a ninth cannot even wait (--max-queue 4)
    status, body = srv.request("POST", "/v1/sessions", {"prompt": PROMPT})
    assert status == 503 and body["error"]["code"] == "busy" and "max-queue" in body["error"]["message"]
    results, errors = {}, []

    def client(i, sess):
        try:
            c = Conn(srv, sess)
            for _ in range(3):
                c.event("block", timeout=90)
            c.send(type="close")
            c.event("end", timeout=30)
            results[i] = c
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, e))
    threads = [threading.Thread(target=client, args=(i, s), daemon=True) for i, s in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not errors, errors
    assert len(results) == 8
    for i, s in enumerate(sessions):
        st = [e["state"] for e in results[i].events if e["type"] == "state"]
        if s["state"] == "waiting":  # it waited, then ran once others closed
            assert st[0] == "waiting" and "running" in st, st
    h = pages_back_to_zero(srv)
    assert h["kv_pages_used"] == 0 and h["waiting"] == 0, h


def test_snapshot_download_upload_and_restore(srv):
    s = open_session(srv, seed=5, video="jpeg")
    c = Conn(srv, s)
    c.event("block", block=1)
    c.send(type="snapshot", seq=1)
    snap = c.event("snapshot", seq=1)
    assert snap["bytes"] > 0
    # the original goes on: its frames after the snapshot point
    c.until(lambda e: e["type"] == "block" and e["frames"][0] >= snap["frame"] + 4)
    c.event("block")
    frames = {}
    for blk, b in c.binary:
        frames.setdefault(blk, []).append(np.asarray(Image.open(io.BytesIO(b))))
    want = np.stack(frames[snap["block"]])
    c.send(type="close")
    c.event("end")
    # move it: download, upload as a new snapshot, open a session from it
    status, data = srv.request("GET", f"/v1/snapshots/{snap['snapshot']}")
    assert status == 200 and len(data) == snap["bytes"]
    status, up = srv.request("PUT", "/v1/snapshots", raw=data)
    assert status == 201, up
    status, bad = srv.request("PUT", "/v1/snapshots", raw=data[: len(data) // 2])
    assert status == 400 and "not a snapshot" in bad["error"]["message"]
    r = open_session(srv, snapshot=up["snapshot"], video="jpeg")
    assert r["frames"] == snap["frame"] and r["block"] == snap["block"]
    rc = Conn(srv, r)
    first = rc.event("block")
    assert first["frames"][0] == snap["frame"]
    rc.event("block")
    got = np.stack([np.asarray(Image.open(io.BytesIO(b))) for blk, b in rc.binary if blk == first["block"]])
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 1.0
    rc.send(type="close")
    rc.event("end")
    assert srv.request("DELETE", f"/v1/snapshots/{up['snapshot']}")[0] == 200
    assert srv.request("GET", f"/v1/snapshots/{up['snapshot']}")[0] == 404
    assert pages_back_to_zero(srv)["kv_pages_used"] == 0


# ---- credentials, reaping, shutdown (servers of their own) ---------------------------------------------------
def test_api_key_and_idle_reaping():
    key = "k" * 24
    with ServerProcess("--idle-timeout", "1", "--log-level", "info", api_key=key) as srv:
        for path in ("/v1/health", "/v1/model", "/metrics"):
            status, body = srv.request("GET", path, headers={"Authorization": "Bearer wrong-key-123"})
            assert status == 401 and body["error"]["code"] == "unauthorized"
        srv.api_key = None
        assert srv.request("POST", "/v1/sessions", {"prompt": PROMPT})[0] == 401
        srv.api_key = key
        s = open_session(srv, video="jpeg")
        # the WebSocket needs the key too (?key= for browsers)
        ws = connect(f"{srv.ws_url}/v1/sessions/{s['id']}/ws?token={s['token']}", open_timeout=10).__enter__()
        e = json.loads(ws.recv(timeout=10))
        assert e["type"] == "error" and e["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        c = Conn(srv, s, query=f"&key={key}")
        c.event("block")
        time.sleep(2.0)  # a connected client keeps it alive past the idle timeout
        assert srv.get(f"/v1/sessions/{s['id']}", token=s["token"])["state"] == "running"
        c.close()
        deadline = time.monotonic() + 10
        while srv.get(f"/v1/sessions/{s['id']}", token=s["token"])["state"] != "cancelled":
            assert time.monotonic() < deadline, "the idle session was never closed"
            time.sleep(0.1)
        assert pages_back_to_zero(srv)["kv_pages_used"] == 0
        log = srv.output()
        assert "WebSocket /v1/sessions/" in log  # the handshakes were logged, without credentials
        assert s["token"] not in log and key not in log


def test_finished_session_still_delivers_to_a_late_client(srv):
    s = open_session(srv, num_frames=8, video="jpeg")  # 2 blocks: done before the client comes
    deadline = time.monotonic() + 20
    while srv.get(f"/v1/sessions/{s['id']}", token=s["token"])["state"] != "finished":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    c = Conn(srv, s)
    assert c.event("end")["reason"] == "finished"
    assert len(c.binary) == 8 and [b["frames"] for b in c.blocks()] == [[0, 4], [4, 8]]
    assert all(b["gen_s"] > 0.001 for b in c.blocks())  # a block's time on the engine, not a hook's instant
    status, _ = srv.request("GET", f"/v1/sessions/{s['id']}", token=s["token"])
    assert status == 200
    # everything was delivered: a second client is told the session has ended
    ws = connect(f"{srv.ws_url}/v1/sessions/{s['id']}/ws?token={s['token']}", open_timeout=10).__enter__()
    e = json.loads(ws.recv(timeout=10))
    assert e["type"] == "error" and e["code"] == "not_allowed" and "ended" in e["message"]


def test_sigterm_ends_every_session_cleanly():
    srv = ServerProcess("--max-sessions", "2")
    try:
        a = Conn(srv, open_session(srv, video="jpeg"))
        b = Conn(srv, open_session(srv, video="fmp4"))
        a.event("block")
        b.event("block")
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for c in (a, b):
            assert c.event("end", timeout=15)["reason"] == "server_shutdown"
        assert srv.proc.wait(20) == 0
        assert time.monotonic() - t0 < 20
        assert "Traceback" not in srv.output()
    finally:
        srv.stop()


def test_bad_flags_fail_before_loading():
    r = subprocess.run([sys.executable, "-m", "inferix", "serve", "--max-ahead", "0"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "max-ahead must be an int >= 1" in r.stderr
