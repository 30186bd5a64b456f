"""WebRTC (app/serve_webrtc.py) with a real aiortc client: first against a stand-in session bridge in this
process (pacing, pts, events, control forwarding, clean-up), then against a real ``inferix serve`` process (the
``server`` fixture): >= 8 frames of the model's size, an ``act`` over the data channel answered by ``ack`` and
``applied``, and the KV pages back to 0 once the session is deleted.

ICE uses host candidates only (no STUN/TURN: there is no network beyond this machine). Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

aiortc = pytest.importorskip("aiortc")
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402

from inferix.app import serve_webrtc  # noqa: E402
from inferix.app.serve_webrtc import OfferError, SessionBridge, answer_offer  # noqa: E402

FPS = 16.0


class Client:
    """An aiortc peer that receives the video and talks over the data channel."""

    def __init__(self):
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        self.channel = self.pc.createDataChannel("control")
        self.events: list[dict] = []
        self.frames: list = []  # (pts, time_base, rgb array)
        self.track_ended = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self.channel.on("message", lambda m: self.events.append(json.loads(m)))
        self.pc.on("track", self._on_track)

    def _on_track(self, track):
        async def read():
            try:
                while True:
                    f = await track.recv()
                    self.frames.append((f.pts, f.time_base, f.to_ndarray(format="rgb24")))
            except Exception:  # MediaStreamError at the end
                self.track_ended.set()
        self._reader = asyncio.ensure_future(read())

    async def offer(self) -> dict:
        await self.pc.setLocalDescription(await self.pc.createOffer())  # gathers every candidate first
        return {"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type}

    async def answer(self, answer: dict) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))

    async def wait(self, cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = cond()
            if got:
                return got
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; events: {self.events[-8:]}")

    def event(self, type_: str, **match):
        for ev in self.events:
            if ev.get("type") == type_ and all(ev.get(k) == v for k, v in match.items()):
                return ev
        return None

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


class FakeBridge:
    """A session of numbered blocks of 4 frames (block k is filled with the value 20 * k)."""

    fps, width, height = FPS, 64, 48

    def __init__(self, blocks: int | None = None, delay: float = 0.0):
        self.blocks, self.delay = blocks, delay
        self.k = 0
        self.attached = 0
        self.detached = 0
        self.cancelled = 0
        self.controls: list[dict] = []
        self.send_event = self.on_detach = None

    def attach(self, send_event, on_detach):
        self.attached += 1
        self.send_event, self.on_detach = send_event, on_detach

    async def next_block(self):
        if self.blocks is not None and self.k >= self.blocks:
            self.send_event({"type": "end", "reason": "finished", "frames": 4 * self.k})
            return None
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        k = self.k
        self.k += 1
        frames = np.full((4, self.height, self.width, 3), (20 * k) % 256, np.uint8)
        frames[:, : self.height // 2, :, 1] = 200  # not a constant image
        return {"block": k, "frames": [4 * k, 4 * k + 4]}, frames

    async def handle_control(self, msg, reply):
        self.controls.append(msg)
        reply({"type": "ack", "seq": msg.get("seq")})
        # applied is answered later and from another thread, as the server does once the block is ready
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, reply, {"type": "applied", "seq": msg.get("seq"), "block": self.k + 2})

    def detach(self):
        self.detached += 1


def test_bridge_is_the_protocol():
    assert isinstance(FakeBridge(), SessionBridge)


async def _connect(bridge, **kw) -> Client:
    c = Client()
    await c.answer(await answer_offer(bridge, **(await _offer_args(c)), **kw))
    return c


async def _offer_args(c: Client) -> dict:
    o = await c.offer()
    return {"offer_sdp": o["sdp"], "offer_type": o["type"]}


def test_fake_bridge_frames_events_controls_and_cleanup():
    async def run():
        bridge = FakeBridge(delay=0.02)
        c = await _connect(bridge, max_message_bytes=200)
        try:
            assert bridge.attached == 1 and serve_webrtc.active_peers() == 1
            await c.wait(lambda: len(c.frames) >= 16, 15, "16 frames")
            t0 = time.monotonic()
            n0 = len(c.frames)
            await c.wait(lambda: len(c.frames) >= n0 + 16, 15, "16 more frames")
            rate = 16 / (time.monotonic() - t0)
            assert 0.6 * FPS < rate < 1.6 * FPS, f"frames came at {rate:.1f}/s, not about {FPS}"
            pts, tb, img = c.frames[-1]
            assert img.shape == (48, 64, 3)
            steps = [b[0] - a[0] for a, b in zip(c.frames[-12:], c.frames[-11:])]
            assert all(abs(s - 90000 / FPS) <= 2 for s in steps), steps  # a 90 kHz clock, 1/fps apart
            assert c.events[0] == {"type": "media", "video": "webrtc", "width": 64, "height": 48, "fps": FPS}
            blocks = [ev["block"] for ev in c.events if ev["type"] == "block"]
            assert blocks[:4] == [0, 1, 2, 3]

            await c.wait(lambda: c.channel.readyState == "open", 5, "the data channel")
            c.channel.send(json.dumps({"type": "act", "action": "left", "seq": 5}))
            c.channel.send("{not json")
            c.channel.send(json.dumps({"type": "prompt", "prompt": "x" * 300, "seq": 6}))
            c.channel.send(json.dumps([1, 2]))
            c.channel.send(b"\x00\x01")
            await c.wait(lambda: c.event("applied", seq=5), 5, "applied 5")
            assert c.event("ack", seq=5)
            await c.wait(lambda: len([e for e in c.events if e["type"] == "error"]) >= 4, 5, "four errors")
            codes = [e["code"] for e in c.events if e["type"] == "error"]
            assert codes == ["bad_json", "too_large", "bad_message", "bad_message"], codes
            assert bridge.controls == [{"type": "act", "action": "left", "seq": 5}]
        finally:
            await c.close()
        # the client went away: the peer closes, its pending next_block is cancelled, the bridge detached
        await c.wait(lambda: serve_webrtc.active_peers() == 0, 15, "the peer to close")
        assert bridge.detached == 1
        await asyncio.sleep(0.1)
        left = [t for t in asyncio.all_tasks()
                if t is not asyncio.current_task() and t.get_coro().__name__ != "wait_for"]  # this test's own
        assert not left, f"tasks left running: {left}"

    asyncio.run(asyncio.wait_for(run(), 60))


def test_fake_bridge_stream_end_and_server_detach():
    async def run():
        # the stream ends: the end event arrives, the track ends, the peer closes and detaches
        bridge = FakeBridge(blocks=3)
        c = await _connect(bridge)
        try:
            await c.wait(lambda: c.event("end"), 15, "the end event")
            await c.wait(lambda: serve_webrtc.active_peers() == 0, 10, "the peer to close at the end")
            assert bridge.detached == 1
            assert [e["block"] for e in c.events if e["type"] == "block"] == [0, 1, 2]
            assert len(c.frames) >= 8  # the receiver holds back the very last frame until another arrives
        finally:
            await c.close()

        # the server takes the session away (another client): on_detach closes the peer, no detach() back
        bridge = FakeBridge(delay=0.05)
        c = await _connect(bridge)
        try:
            await c.wait(lambda: len(c.frames) >= 4, 15, "4 frames")
            bridge.send_event({"type": "end", "reason": "replaced", "frames": 4 * bridge.k})
            bridge.on_detach()
            await c.wait(lambda: serve_webrtc.active_peers() == 0, 10, "the peer to close when detached")
            assert bridge.detached == 0
            assert c.event("end", reason="replaced")
            await c.wait(lambda: c.pc.connectionState == "closed" or c.track_ended.is_set(), 15,
                         "the client to see the peer go")
        finally:
            await c.close()

    asyncio.run(asyncio.wait_for(run(), 60))


def test_bad_offers_attach_nothing():
    async def run():
        bridge = FakeBridge()
        for sdp, kind in [("v=0\r\n", "offer"), ("", "offer"), ("garbage m=video", "offer")]:
            with pytest.raises(OfferError):
                await answer_offer(bridge, sdp, kind)
        c = Client()
        o = await c.offer()
        with pytest.raises(OfferError):
            await answer_offer(bridge, o["sdp"], "answer")
        await c.close()
        # an offer with only a data channel has no video to send
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.createDataChannel("control")
        await pc.setLocalDescription(await pc.createOffer())
        with pytest.raises(OfferError):
            await answer_offer(bridge, pc.localDescription.sdp, "offer")
        await pc.close()
        assert bridge.attached == 0 and serve_webrtc.active_peers() == 0

    asyncio.run(asyncio.wait_for(run(), 30))


def test_webrtc_against_the_server(server):
    """The real server: a session, the offer, >= 8 frames of 64x64, an act acked and applied, then close."""
    import httpx
    base = str(getattr(server, "url", server)).rstrip("/")

    async def run():
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            model = (await http.get("/v1/model")).json()
            assert model["webrtc"] is True
            r = await http.post("/v1/sessions", json={"prompt": "a red cube in a snowy field", "seed": 1,
                                                      "num_frames": None})
            assert r.status_code in (201, 202), r.text
            s = r.json()
            tok = {"X-Session-Token": s["token"]}
            c = Client()
            try:
                r = await http.post(f"/v1/sessions/{s['id']}/webrtc", json=await c.offer(), headers=tok)
                assert r.status_code == 200, r.text
                answer = r.json()
                assert answer["type"] == "answer" and "a=candidate" in answer["sdp"]
                await c.answer(answer)
                await c.wait(lambda: len(c.frames) >= 8, 60, "8 frames from the server's track")
                assert all(f[2].shape == (model["height"], model["width"], 3) for f in c.frames)
                assert len({f[0] for f in c.frames}) == len(c.frames)  # pts advance
                assert c.event("media", video="webrtc", width=model["width"], height=model["height"])
                await c.wait(lambda: c.event("block"), 10, "a block event")

                await c.wait(lambda: c.channel.readyState == "open", 10, "the data channel")
                c.channel.send(json.dumps({"type": "act", "action": "left", "seq": 41}))
                await c.wait(lambda: c.event("ack", seq=41), 15, "ack 41")
                applied = await c.wait(lambda: c.event("applied", seq=41), 30, "applied 41")
                assert isinstance(applied["block"], int)
                c.channel.send("{oops")
                await c.wait(lambda: c.event("error", code="bad_json"), 10, "a bad_json error")
                st = (await http.get(f"/v1/sessions/{s['id']}", headers=tok)).json()
                assert st["clients"] >= 1 and st["state"] == "running", st
            finally:
                await c.close()

            # the peer is gone: the session has no client any more, then it is deleted and its pages freed
            async def no_client():
                return (await http.get(f"/v1/sessions/{s['id']}", headers=tok)).json()["clients"] == 0
            deadline = time.monotonic() + 20
            while not await no_client():
                assert time.monotonic() < deadline, "the session still counts the closed peer as a client"
                await asyncio.sleep(0.1)
            r = await http.delete(f"/v1/sessions/{s['id']}", headers=tok)
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 45  # sessions of earlier tests are reaped after the idle timeout
            while (h := (await http.get("/v1/health")).json())["kv_pages_used"] != 0:
                assert time.monotonic() < deadline, f"KV pages still in use: {h}"
                await asyncio.sleep(0.2)

    asyncio.run(asyncio.wait_for(run(), 150))
