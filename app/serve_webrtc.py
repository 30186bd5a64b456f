"""WebRTC for ``inferix serve``: one aiortc peer connection per client, a live video track of the session's frames
and the JSON control messages and events over a data channel.

How to wire it (app/serve.py)
-----------------------------
``POST /v1/sessions/{id}/webrtc`` checks the credentials and the session token as for any session route, builds an
object that implements :class:`SessionBridge` for that session (the WebRTC counterpart of one WebSocket client)
and returns the answer::

    from .serve_webrtc import OfferError, answer_offer, close_all

    try:
        answer = await answer_offer(bridge, body["sdp"], body["type"], max_message_bytes=cfg.max_message_kib * 1024)
    except OfferError as e:
        return error(400, "bad_value", str(e))
    return answer                                  # {"sdp": ..., "type": "answer"}

and at shutdown (after every session was told ``end``): ``await close_all()``. ``AVAILABLE`` says whether aiortc
could be imported (for ``"webrtc"`` in ``GET /v1/model``).

The bridge (see :class:`SessionBridge`) is the session as one client sees it: the blocks a WebSocket client would
read (as raw RGB frames: this module encodes them), the same control handler, the
same event stream. ``handle_control`` gets one message at a time, so it should return once the message is
accepted (``ack``) and answer what comes later (``applied``, ``forked``...) through the ``reply`` it was given.

``answer_offer`` calls ``bridge.attach(...)`` once, only after the answer was made (a bad offer takes nothing
over). From then on the peer is the session's one client, exactly like a WebSocket that just connected: the
server detaches any earlier client (a WebSocket gets ``end`` ``replaced`` and close code 4001), and a later client
replaces this peer in turn through ``on_detach``. Everything here runs on the server's asyncio loop; frames are
pulled by the video track at the model's frame rate, so the session's ``--max-ahead`` backpressure applies to a
WebRTC client as it does to a WebSocket one.

ICE: no STUN or TURN server is used (``iceServers`` is empty), only host candidates: a client on the same machine
or network connects directly. The offer must carry its candidates (wait for ICE gathering to complete before
sending it: there is no trickle ICE). Chromium hides its host addresses behind mDNS names unless started with
``--disable-features=WebRtcHideLocalIpsWithMdns`` (tests use it). Neither aiortc nor Chromium offers the loopback
address: on one machine the peers meet on its interface addresses.
"""
from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import time
from collections import deque
from typing import Any, Awaitable, Callable, Protocol, runtime_checkable

import numpy as np

try:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
    from av import VideoFrame
    AVAILABLE = True  # the server reports it as "webrtc" in GET /v1/model
except ImportError:  # aiortc is optional: without it the server answers WebRTC requests with an error
    AVAILABLE = False
    MediaStreamTrack = object

__all__ = ["SessionBridge", "OfferError", "BlockVideoTrack", "answer_offer", "close_all", "active_peers",
           "VIDEO_CLOCK_RATE", "AVAILABLE"]

log = logging.getLogger("inferix.serve.webrtc")

VIDEO_CLOCK_RATE = 90000  # RTP video clock: pts are in 1/90000 s
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
CONNECT_TIMEOUT_S = 30.0  # an answered peer that never connects is dropped after this long
DISCONNECT_GRACE_S = 8.0  # ICE "disconnected" for this long (a dead client) ends the peer
FLUSH_TIMEOUT_S = 1.0  # at most this long to let queued data-channel events go out before closing
CONTROL_QUEUE = 64  # control messages waiting for the server; beyond that a message gets "busy"


@runtime_checkable
class SessionBridge(Protocol):
    """What the server gives :func:`answer_offer` for one session: the session seen by one WebRTC client.

    Attributes (read once, when the peer is made):

    - ``fps`` (float): the model's pixel frame rate; the track sends frames at this rate.
    - ``width``, ``height`` (int): the frame size; every block's frames have it.

    Methods, all called on the server's event loop:

    - ``attach(send_event, on_detach)``: called once, when the answer is ready. The peer becomes the session's
      client (as a WebSocket that connects does). ``send_event(event: dict)`` sends one JSON event (``state``,
      ``forked``, ``snapshot``, ``error``, ``end``...: every event of the WebSocket protocol except ``media`` and
      ``block``, which this module sends itself) to the client over the data channel; it may be called from any
      thread, and before the channel opens (events are queued until then). ``on_detach()`` is for the server to
      call when the session stops belonging to this peer: another client took it over (send ``end`` ``replaced``
      first), it ended (send ``end`` first), or the server shuts down. The peer connection is then closed after
      the queued events went out (bounded by ``FLUSH_TIMEOUT_S``); ``detach`` is not called after ``on_detach``.
    - ``async next_block() -> (block_event, frames) | None``: the session's next block for this client, waiting
      for it as long as it takes (a paused or waiting session simply has none yet). ``block_event`` is the
      WebSocket ``block`` event (``{"type": "block", "block", "frames": [start, end], "gen_s", "decode_s", "t"}``;
      ``type`` is filled in when missing); it is sent over the data channel when the block's first frame goes out.
      ``frames`` is a numpy ``uint8`` array ``[T, height, width, 3]`` (RGB). Taking a block counts as delivering it
      to the client (backpressure). ``None`` means the stream is over (the session finished, was cancelled or
      failed; the server sends ``end`` through ``send_event``): the track ends and the peer is closed. The call
      may be cancelled at any time (the peer went away) and must then leave the session consistent; blocks it had
      not returned yet simply stay for the next client.
    - ``async handle_control(msg: dict, reply)``: one control message from the data channel, already parsed as a
      JSON object (this module answers ``bad_json``, ``bad_message`` and ``too_large`` itself, with the same event
      shapes as the WebSocket path). The server validates it as a WebSocket text message and answers through
      ``reply(event: dict)`` (``ack``, ``applied``, ``forked``, ``snapshot``, ``error``, with the message's
      ``seq``); ``reply`` may be kept and called later (``applied`` comes once the block it applies in is ready)
      and from any thread. Messages are handed over one at a time, in order: the next waits until this returns.
    - ``detach()``: the peer went away (closed its connection, failed ICE, never connected, the stream ended) or
      the server called :func:`close_all`. Called at most once, on the loop, after any pending ``next_block`` was
      cancelled; must not block. The session then has no client (idle timeout, as for a WebSocket that closed).
    """

    fps: float
    width: int
    height: int

    def attach(self, send_event: Callable[[dict], None], on_detach: Callable[[], None]) -> None: ...

    async def next_block(self) -> tuple[dict, np.ndarray] | None: ...

    async def handle_control(self, msg: dict, reply: Callable[[dict], None]) -> None: ...

    def detach(self) -> None: ...


class OfferError(ValueError):
    """The offer cannot be answered (not an offer, malformed SDP, no video to receive). Answer 400."""


def _error(code: str, message: str, seq: Any = None) -> dict:
    ev = {"type": "error", "code": code, "message": message}
    if isinstance(seq, int) and not isinstance(seq, bool):
        ev["seq"] = seq
    return ev


class BlockVideoTrack(MediaStreamTrack):
    """A live video track that pulls blocks from a :class:`SessionBridge` and sends their frames at the model's
    frame rate. ``pts`` are in the 90 kHz RTP clock and follow the wall clock: frames of a block go out ``1/fps``
    apart; when the next block is late the clock is re-anchored at its arrival instead of sending a burst, so the
    receiver always plays at the live edge. ``on_block(event)`` runs as a block's first frame goes out,
    ``on_end()`` once the bridge says the stream is over."""

    kind = "video"

    def __init__(self, bridge: SessionBridge, on_block: Callable[[dict], None], on_end: Callable[[], None]):
        super().__init__()
        self._bridge = bridge
        self._on_block = on_block
        self._on_end = on_end
        self.period = 1.0 / float(bridge.fps)
        self._frames: deque = deque()  # the block event, then its frames, for each block taken
        self._t0: float | None = None  # loop time of pts 0
        self._next: float | None = None  # loop time the next frame is due
        self.frames_sent = 0
        self.blocks = 0

    @property
    def queued_frames(self) -> int:
        return sum(1 for f in self._frames if not isinstance(f, dict))

    async def _fill(self) -> None:
        while not self._frames:
            item = await self._bridge.next_block()
            if item is None:
                raise MediaStreamError("the stream is over")
            event, frames = item
            frames = np.asarray(frames)
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
                raise TypeError(f"next_block() must give uint8 frames [T, H, W, 3], got {frames.dtype} "
                                f"{tuple(frames.shape)}")
            event = dict(event or {})
            event.setdefault("type", "block")
            self.blocks += 1
            if len(frames):
                self._frames.append(event)  # sent with the block's first frame
                self._frames.extend(frames)

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        try:
            await self._fill()
        except MediaStreamError:
            self.stop()
            self._on_end()
            raise
        except Exception as e:  # asyncio.CancelledError passes: the sender is being stopped
            log.exception("next_block() failed; the WebRTC stream ends")
            self.stop()
            self._on_end()
            raise MediaStreamError(str(e)) from e
        item = self._frames.popleft()
        if isinstance(item, dict):
            self._on_block(item)
            item = self._frames.popleft()
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._next is None:
            self._t0 = self._next = now
        elif self._next > now:
            await asyncio.sleep(self._next - now)
        elif now - self._next > self.period:  # late (waited for a block): restart the clock here
            self._next = now
        pts = int(round((self._next - self._t0) * VIDEO_CLOCK_RATE))
        self._next += self.period
        frame = VideoFrame.from_ndarray(np.ascontiguousarray(item), format="rgb24")
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        self.frames_sent += 1
        return frame


_peers: set["_Peer"] = set()


def active_peers() -> int:
    """Peer connections open now (for tests and health output)."""
    return len(_peers)


class _Peer:
    """One client: the peer connection, its track, its data channel and the tasks that serve them."""

    def __init__(self, bridge: SessionBridge, pc, max_message_bytes: int, connect_timeout: float):
        self.bridge = bridge
        self.pc = pc
        self.max_message_bytes = max_message_bytes
        self.loop = asyncio.get_running_loop()
        self.channel = None
        self.pending: deque[str] = deque()  # events waiting for the channel to open
        self.controls: asyncio.Queue = asyncio.Queue(CONTROL_QUEUE)
        self.tasks: set[asyncio.Task] = set()
        self.attached = False
        self.server_detached = False
        self.closing: asyncio.Task | None = None
        self.close_started = False
        self.closed = asyncio.Event()
        self.track = BlockVideoTrack(bridge, self._send_now, self._track_ended)
        self._disconnect_timer: asyncio.TimerHandle | None = None
        self._connect_timer = self.loop.call_later(connect_timeout, self._connect_timeout)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_state)

    # -- events to the client ------------------------------------------------------------------------------------
    def send_event(self, event: dict) -> None:
        """Thread-safe: queue one JSON event for the data channel."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self.loop:
            self.loop.call_soon_threadsafe(self._send_now, event)
        else:
            self._send_now(event)

    def _send_now(self, event: dict) -> None:
        if self.closed.is_set():
            return
        try:
            text = json.dumps(event, separators=(",", ":"))
        except (TypeError, ValueError):
            log.exception("an event could not be encoded as JSON")
            return
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            try:
                ch.send(text)
            except Exception:  # the channel closed under us: the peer is going away
                log.debug("data channel send failed", exc_info=True)
        else:
            self.pending.append(text)
        if event.get("type") == "end":
            # the session is over for this peer: the track plays what it already has, then next_block() gives
            # None and the peer closes; this is the fallback should the server not end the track
            self.loop.call_later(self.track.queued_frames * self.track.period + 2.0, self._close_soon, "end")

    def _media_event(self) -> dict:
        return {"type": "media", "video": "webrtc", "width": int(self.bridge.width),
                "height": int(self.bridge.height), "fps": float(self.bridge.fps)}

    # -- data channel --------------------------------------------------------------------------------------------
    def _on_datachannel(self, channel) -> None:
        if self.channel is not None:  # one control channel per peer: later ones are ignored
            return
        self.channel = channel

        def opened():
            channel.send(json.dumps(self._media_event(), separators=(",", ":")))
            while self.pending and channel.readyState == "open":
                channel.send(self.pending.popleft())

        if channel.readyState == "open":
            opened()
        else:
            channel.on("open", opened)
        channel.on("message", self._on_message)
        channel.on("close", lambda: self._close_soon("data channel closed"))
        self._spawn(self._control_loop())

    def _on_message(self, data) -> None:
        if self.closed.is_set():
            return
        if isinstance(data, (bytes, bytearray)):
            self._send_now(_error("bad_message", "binary messages are not accepted; send JSON text"))
            return
        if len(data.encode("utf-8", "surrogatepass")) > self.max_message_bytes:
            self._send_now(_error("too_large", f"a message may have at most {self.max_message_bytes} bytes"))
            return
        try:
            msg = json.loads(data)
        except ValueError:
            self._send_now(_error("bad_json", "the message is not valid JSON"))
            return
        if not isinstance(msg, dict):
            self._send_now(_error("bad_message", "a message must be a JSON object with a \"type\""))
            return
        try:
            self.controls.put_nowait(msg)
        except asyncio.QueueFull:
            self._send_now(_error("busy", "too many control messages waiting", msg.get("seq")))

    async def _control_loop(self) -> None:
        while True:
            msg = await self.controls.get()
            try:
                await self.bridge.handle_control(msg, self.send_event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("handle_control failed")
                self._send_now(_error("bad_message", "the message could not be handled", msg.get("seq")))

    # -- lifetime ------------------------------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable) -> asyncio.Task:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self._connect_timer.cancel()
            if self._disconnect_timer is not None:
                self._disconnect_timer.cancel()
                self._disconnect_timer = None
        elif state == "disconnected":  # may recover; a dead client turns "failed" or stays here
            if self._disconnect_timer is None:
                self._disconnect_timer = self.loop.call_later(DISCONNECT_GRACE_S, self._close_soon, "disconnected")
        elif state in ("failed", "closed"):
            self._close_soon(f"connection {state}")

    def _connect_timeout(self) -> None:
        if self.pc.connectionState != "connected":
            self._close_soon("never connected")

    def _track_ended(self) -> None:
        self._close_soon("stream over")

    def on_detach(self) -> None:
        """For the server (any thread): the session no longer belongs to this peer."""
        def detached():
            self.server_detached = True
            self._close_soon("detached by the server")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            detached()
        else:
            self.loop.call_soon_threadsafe(detached)

    def _close_soon(self, why: str) -> None:
        if self.closing is None and not self.close_started:
            log.debug("closing a WebRTC peer: %s", why)
            self.closing = self.loop.create_task(self.close())

    async def _flush(self) -> None:
        ch = self.channel
        if ch is None or ch.readyState != "open":
            return
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while ch.readyState == "open" and ch.bufferedAmount > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # the last SCTP chunk leaves after bufferedAmount drops

    async def close(self) -> None:
        """Close everything once: flush events, stop the track (cancels a pending ``next_block``), close the
        peer connection, cancel this peer's tasks and detach from the session."""
        if self.close_started:
            await self.closed.wait()
            return
        self.close_started = True
        self._connect_timer.cancel()
        if self._disconnect_timer is not None:
            self._disconnect_timer.cancel()
        try:
            with contextlib.suppress(Exception):
                await self._flush()
            self.track.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pc.close(), 10)
        finally:
            self.closed.set()
            current = asyncio.current_task()
            for task in list(self.tasks):
                if task is not current:
                    task.cancel()
            if self.tasks:
                await asyncio.gather(*(t for t in self.tasks if t is not current), return_exceptions=True)
            _peers.discard(self)
            if self.attached and not self.server_detached:
                try:
                    self.bridge.detach()
                except Exception:
                    log.exception("detach failed")


async def answer_offer(session_bridge: SessionBridge, offer_sdp: str, offer_type: str, *,
                       max_message_bytes: int = 64 * 1024, connect_timeout: float = CONNECT_TIMEOUT_S) -> dict:
    """Answer a client's SDP offer for one session; returns ``{"sdp", "type": "answer"}``.

    The offer should have one receive-only (or send-receive) video transceiver and a data channel, and carry its
    ICE candidates. Raises :class:`OfferError` for an offer that cannot be answered (the server answers 400);
    nothing is attached to the session then. ``max_message_bytes`` caps one data-channel message (the server's
    ``--max-message-kib``); ``connect_timeout`` drops a peer that never connects.
    """
    if not AVAILABLE:
        raise RuntimeError("WebRTC needs the aiortc package")
    if offer_type != "offer":
        raise OfferError(f"type must be \"offer\", not {offer_type!r}")
    if not isinstance(offer_sdp, str) or not offer_sdp.strip():
        raise OfferError("sdp must be a non-empty string")
    if "m=video" not in offer_sdp:
        raise OfferError("the offer has no video section (add a receive-only video transceiver)")
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN/TURN: host candidates only
    peer = _Peer(session_bridge, pc, int(max_message_bytes), float(connect_timeout))
    _peers.add(peer)
    try:
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as e:  # aiortc raises ValueError and friends for SDP it cannot use
            raise OfferError(f"the offer cannot be used: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None
        if not any(t.kind == "video" for t in pc.getTransceivers()):
            raise OfferError("the offer has no video section (add a receive-only video transceiver)")
        pc.addTrack(peer.track)
        try:
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:
            raise OfferError(f"no answer fits the offer: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None
        answer = pc.localDescription
    except BaseException:
        await peer.close()
        raise
    try:
        session_bridge.attach(peer.send_event, peer.on_detach)
    except BaseException:
        await peer.close()
        raise
    peer.attached = True
    return {"sdp": answer.sdp, "type": answer.type}


async def close_all() -> None:
    """Close every open peer connection (server shutdown). Each detaches from its session unless the server
    already called its ``on_detach``."""
    peers = list(_peers)
    if peers:
        await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)
