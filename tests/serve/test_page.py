"""The page at ``/`` of a real ``inferix serve`` process (the ``server`` fixture), driven in headless Debian
Chromium by PyPI playwright (never ``playwright install``): the MediaSource path (fMP4 over the WebSocket) and the
WebRTC path (aiortc video track + data channel, host candidates only: Chromium runs with
``--disable-features=WebRtcHideLocalIpsWithMdns`` so its offer carries real addresses, not mDNS names).

Every wait is bounded; the page's sessions are checked to be gone at the end of each test.
"""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
from server_proc import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.browser]


# the <video> element and the page's own state, in one round trip
PROBE = """() => {
  const v = document.getElementById("video");
  const q = v.getVideoPlaybackQuality();
  const track = v.srcObject && v.srcObject.getVideoTracks ? v.srcObject.getVideoTracks()[0] : null;
  return {t: v.currentTime, decoded: q.totalVideoFrames, w: v.videoWidth, h: v.videoHeight, ready: v.readyState,
          track: track ? track.readyState : null, state: document.getElementById("state").textContent,
          frames: Number(document.getElementById("frames").textContent) || 0,
          latency: document.getElementById("latency").textContent, error: document.getElementById("error").textContent,
          session: window.inferix.session, transport: window.inferix.transport};
}"""

# pixels of the current frame differ (the frame is not blank): draws the <video> to a canvas
NOT_BLANK = """() => {
  const v = document.getElementById("video");
  if (!v.videoWidth) return false;
  const c = document.createElement("canvas");
  c.width = v.videoWidth; c.height = v.videoHeight;
  const g = c.getContext("2d");
  g.drawImage(v, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let lo = 255, hi = 0;
  for (let i = 0; i < d.length; i += 4) { lo = Math.min(lo, d[i + 1]); hi = Math.max(hi, d[i + 1]); }
  return hi - lo > 8;
}"""


def _base(server) -> str:
    return str(getattr(server, "url", server)).rstrip("/")


def _status(base: str, sid: str, token: str) -> int:
    req = urllib.request.Request(f"{base}/v1/sessions/{sid}", headers={"X-Session-Token": token})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            state = json.loads(r.read())["state"]
            return 410 if state in ("finished", "cancelled", "failed") else r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture
def page(browser, server):
    """A fresh context and the page, loaded; at the end every session the page opened or forked must be gone
    (the page deletes its sessions when it is left)."""
    base = _base(server)
    ctx = browser.new_context(viewport={"width": 1100, "height": 800})
    ctx.set_default_timeout(15000)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        pg.goto(base + "/")
        pg.wait_for_function("document.getElementById('model').textContent.includes('fps')", timeout=15000)
        yield pg
        known = pg.evaluate("window.inferix.known")
        pg.goto("about:blank")  # pagehide: the page deletes what it still holds
        for s in known:
            wait_until(lambda: _status(base, s["id"], s["token"]) in (404, 410), 15,
                       f"session {s['id']} to be closed after the page was left")
        assert not errors, f"errors in the page: {errors}"
    finally:
        ctx.close()


def probe(pg) -> dict:
    return pg.evaluate(PROBE)


def wait_probe(pg, cond, timeout: float, what: str) -> dict:
    """Wait until cond(probe) holds; a timeout shows the page's last state (its error line included)."""
    seen = {}

    def check():
        seen["p"] = p = probe(pg)
        return p if cond(p) else None
    try:
        return wait_until(check, timeout, what)
    except AssertionError as e:
        raise AssertionError(f"{e}; the page: {seen.get('p')}") from None


def advancing(pg, key: str, timeout: float = 20, what: str = "") -> dict:
    """Wait until probe()[key] grows (twice, so it is moving, not a single step)."""
    first = probe(pg)[key]
    mid = wait_probe(pg, lambda p: p[key] > first, timeout, f"{key} to advance {what}")
    return wait_probe(pg, lambda p: p[key] > mid[key], timeout, f"{key} to keep advancing {what}")


def wait_applied(pg, control: str, after: int = 0, timeout: float = 20) -> dict:
    def find():
        for a in pg.evaluate("window.inferix.applied"):
            if a["control"] == control and a["seq"] > after:
                return a
        return None
    return wait_until(find, timeout, f"an applied {control}")


def test_page_mediasource_keys_prompt_fork(page, server):
    pg = page
    assert pg.evaluate("MediaSource.isTypeSupported('video/mp4; codecs=\"avc1.42C01E\"')"), \
        "this Chromium cannot play H.264 through MediaSource"
    actions = pg.eval_on_selector_all("#actions button", "bs => bs.map(b => b.dataset.action)")
    assert actions == ["none", "up", "down", "left", "right"]
    pg.fill("#prompt", "a red cube in a snowy field")
    pg.fill("#seed", "3")
    pg.click("#start")
    wait_probe(pg, lambda p: p["decoded"] > 0, 30, "decoded frames in the <video>")
    p = advancing(pg, "t", what="(MediaSource playback)")
    assert p["transport"] == "mse" and p["w"] == 64 and p["h"] == 64, p
    assert p["state"].startswith("running"), p
    wait_until(lambda: pg.evaluate(NOT_BLANK), 10, "a frame that is not blank")
    assert probe(pg)["frames"] > 0

    # a key steers: its act is applied and its latency shown
    pg.click("h1")  # the focus leaves the form, keys go to the page
    pg.keyboard.press("ArrowLeft")
    a = wait_applied(pg, "act")
    assert a["ms"] >= 0 and a["block"] >= 0
    wait_until(lambda: re.fullmatch(r"\d+ ms \(block \d+\)", probe(pg)["latency"]), 5, "the latency in the status")
    assert pg.get_attribute("#act-left", "class") == "current"
    pg.click("#act-right")
    wait_applied(pg, "act", after=a["seq"])

    # the prompt switches while it plays
    pg.fill("#prompt", "a blue cube in a snowy field")
    pg.click("#set-prompt")
    wait_applied(pg, "prompt")
    advancing(pg, "t", what="after the prompt switch")

    # pause holds the stream, resume goes on
    pg.click("#pause")
    wait_until(lambda: probe(pg)["state"].startswith("paused") or pg.text_content("#pause") == "Resume", 15,
               "the session to pause")
    pg.click("#pause")
    wait_probe(pg, lambda p: p["state"].startswith("running"), 15, "the session to resume")
    advancing(pg, "frames", what="after resume")

    # fork, then play the fork
    parent = probe(pg)["session"]
    pg.click("#fork")
    fork_id = wait_until(lambda: (f := pg.text_content("#fork-id")) != "-" and f, 20, "the fork's id")
    assert fork_id != parent
    pg.click("#switch-fork")
    wait_probe(pg, lambda p: p["session"] == fork_id, 5, "the page to switch to the fork")
    wait_probe(pg, lambda p: p["state"].startswith("running"), 20, "the fork to run")
    advancing(pg, "frames", what="(the fork)")
    advancing(pg, "t", what="(the fork's playback)")
    assert pg.text_content("#error") == "", pg.text_content("#error")

    # close ends the fork; the parent is still listed and is deleted when the page is left
    pg.click("#close")
    wait_probe(pg, lambda p: p["state"] == "cancelled", 15, "the fork to end")
    assert pg.is_disabled("#pause")


def test_page_webrtc_track_and_data_channel(page, server):
    pg = page
    assert pg.is_enabled("#transport-webrtc")
    pg.check("#transport-webrtc")
    pg.click("#start")
    wait_probe(pg, lambda p: p["track"] == "live", 30, "a live WebRTC video track")
    p = wait_probe(pg, lambda p: p["w"] == 64 and p["decoded"] > 0, 30, "decoded WebRTC frames")
    assert p["transport"] == "webrtc" and p["h"] == 64, p
    advancing(pg, "decoded", what="(WebRTC frames)")
    advancing(pg, "t", what="(WebRTC playback)")
    advancing(pg, "frames", what="(block events over the data channel)")
    wait_until(lambda: pg.evaluate(NOT_BLANK), 10, "a WebRTC frame that is not blank")

    pg.click("h1")
    pg.keyboard.press("d")
    a = wait_applied(pg, "act")
    assert pg.get_attribute("#act-right", "class") == "current"
    wait_until(lambda: re.fullmatch(r"\d+ ms \(block \d+\)", probe(pg)["latency"]), 5, "the latency in the status")
    assert a["ms"] >= 0
    pg.fill("#prompt", "a green cube in a snowy field")
    pg.click("#set-prompt")
    wait_applied(pg, "prompt")
    assert pg.text_content("#error") == "", pg.text_content("#error")

    pg.click("#close")
    wait_probe(pg, lambda p: p["state"] == "cancelled", 15, "the session to end")
    wait_probe(pg, lambda p: p["track"] in (None, "ended"), 15, "the WebRTC track to go")
