"""A Python client for ``inferix serve`` (docs/serve.md): open sessions, read decoded frames, steer them.

    from inferix.client import Client

    with Client("http://127.0.0.1:8000") as c:
        with c.open("a sunny meadow", seed=1, video="jpeg") as s:
            for i, frame in enumerate(s.frames()):      # uint8 [H, W, 3], one per frame, in order
                if i == 32:
                    seq = s.act("left")                 # every control returns its seq
                if i == 200:
                    break
            print(s.wait_applied(seq))                  # the block the action took effect in

An image-conditioned, keyboard-and-mouse model (Matrix-Game; ``model()["takes_image"]``, ``["controls"]``) opens
from a start image and is steered by held keys and camera deltas:

    with c.open(image="start.png", num_frames=None) as s:    # a path, PNG/JPEG bytes or uint8 [H, W, 3]
        s.act({"keys": "wa", "mouse": [0.0, 0.1]})           # forward + left, turning right; held until the next
        s.act({"keys": ["forward"]})                          # no mouse given: the camera holds still

HTTP goes through ``httpx``; the session's WebSocket (``websockets``' sync client) opens on the first call that
needs it (``frames``, ``blocks``, a control message). One reader thread takes the socket's messages: JSON events go
to ``events`` and wake whoever waits for them; video goes to a bounded frame queue. ``jpeg`` frames are decoded
with Pillow as they are read; ``fmp4`` bytes flow through a blocking pipe into a PyAV decode thread (``av.open``
on the pipe with probing turned off, so every frame comes out as soon as its fragment arrives). When the frame
queue is full the reader stops reading the socket, so a consumer that falls behind holds the server's session
still (its ``--max-ahead`` backpressure) instead of filling memory.

Errors the server reports (an HTTP error answer, a WebSocket ``error`` event for a control message, a session
that ends as failed) raise :class:`ServerError` with the server's code and one-line message.
"""
from __future__ import annotations

import base64
import collections
import io
import itertools
import json
import os
import queue
import threading
import time
import urllib.parse
import weakref
from typing import Any, Iterator

import numpy as np

__all__ = ["Client", "RemoteSession", "ServerError"]

_END = object()          # the frame queue's last item
_ENDED_OK = ("finished", "cancelled")
_JOIN_S = 5.0            # longest wait for a helper thread to end


class ServerError(Exception):
    """An error the server answered with: ``code`` (e.g. ``bad_value``, ``not_found``), its one-line
    ``message``, and the HTTP ``status`` (None for errors that came over the WebSocket)."""

    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def __str__(self) -> str:
        where = f"HTTP {self.status}, " if self.status is not None else ""
        return f"{self.message} ({where}{self.code})"

    def __reduce__(self):
        return (type(self), (self.code, self.message, self.status))


def _raise_for(r) -> None:
    """A ServerError for an HTTP error answer (``{"error": {"code", "message"}}``, or whatever came)."""
    if r.status_code < 400:
        return
    code, message = f"http_{r.status_code}", (r.text or r.reason_phrase or "").strip().splitlines()
    message = message[0] if message else f"HTTP {r.status_code}"
    try:
        err = r.json().get("error")
        if isinstance(err, dict):
            code = str(err.get("code") or code)
            message = str(err.get("message") or message)
    except (ValueError, AttributeError):
        pass
    raise ServerError(code, message, r.status_code)


def _encode_image(image) -> str:
    """A start image as base64: uint8 [H, W, 3] arrays are PNG-encoded; PNG/JPEG bytes, or a path to a PNG/JPEG
    file, are sent as they are (the server decodes them and checks the size)."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            image = f.read()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(image)).decode("ascii")
    from PIL import Image
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 [H, W, 3] array (or PNG/JPEG bytes), got {a.dtype} {a.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


class Client:
    """HTTP side of a server: ``health``, ``model``, ``metrics``, and sessions (``open``, ``session``).

    ``api_key`` is sent as ``Authorization: Bearer KEY`` (and as ``?key=`` on WebSockets); ``timeout`` (seconds)
    bounds every HTTP request, the WebSocket handshake and the waits of control messages.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 30):
        import httpx
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = float(timeout)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout)
        self._sessions: weakref.WeakSet[RemoteSession] = weakref.WeakSet()
        self._lock = threading.Lock()

    # -- HTTP -------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, token: str | None = None, json_body: Any = None,
                 expect_json: bool = True):
        headers = {"X-Session-Token": token} if token is not None else None
        r = self._http.request(method, path, json=json_body, headers=headers)
        _raise_for(r)
        if not expect_json:
            return r
        try:
            return r.json()
        except ValueError:
            raise ServerError("bad_response", f"{method} {path} answered {r.status_code} without JSON",
                              r.status_code) from None

    def health(self) -> dict:
        """``GET /v1/health``: status, sessions, waiting, kv_pages_used, kv_pages_total."""
        return self._request("GET", "/v1/health")

    def model(self) -> dict:
        """``GET /v1/model``: name, height, width, fps, block frames, actions, video formats, ..."""
        return self._request("GET", "/v1/model")

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text."""
        return self._request("GET", "/metrics", expect_json=False).text

    def open(self, prompt: str | None = None, seed: int = 0, num_frames: int | None = None, image=None,
             action=None, video: str = "jpeg", snapshot: str | None = None) -> "RemoteSession":
        """Create a session (``POST /v1/sessions``). ``num_frames=None`` is a live session (until closed);
        ``image`` (uint8 [H, W, 3] at the engine's size, PNG/JPEG bytes, or a path to such a file) is the start
        frame of a model that continues frames, and the required start image of an image-conditioned model
        (``model()["takes_image"]``, which needs no prompt); ``action`` is held from the first block (a name, or
        a ``{"keys", "mouse"}`` dict for a keyboard-and-mouse model); ``video`` is ``"jpeg"`` or ``"fmp4"``.
        ``snapshot`` (an id from ``snapshot()`` or an upload) continues a snapshot instead: its prompt, seed and
        frame count come from it, so give none of them. The session may be ``waiting`` for KV pages (``state``,
        ``position``); its frames come once it runs."""
        if video not in ("jpeg", "fmp4"):
            raise ValueError(f"video must be 'jpeg' or 'fmp4', got {video!r}")
        if snapshot is not None:
            given = [k for k, v in (("prompt", prompt), ("num_frames", num_frames), ("image", image),
                                    ("action", action)) if v is not None] + (["seed"] if seed else [])
            if given:
                raise ValueError(f"a session from a snapshot takes its settings from it; drop {given}")
            body: dict[str, Any] = {"snapshot": snapshot, "video": video}
        else:
            if prompt is None and image is not None:
                prompt = ""  # an image-conditioned model takes none; the server's default otherwise
            if not isinstance(prompt, str):
                raise ValueError("a session needs a prompt, a start image or a snapshot to continue")
            body = {"prompt": prompt, "seed": int(seed), "num_frames": num_frames, "video": video}
            if image is not None:
                body["image"] = _encode_image(image)
            if action is not None:
                body["action"] = action
        data = self._request("POST", "/v1/sessions", json_body=body)
        return self._track(RemoteSession(self, data, video=video))

    def session(self, id: str, token: str) -> "RemoteSession":
        """Re-attach to a session by its id and token (checked at once with ``GET /v1/sessions/{id}``); its
        WebSocket, opened on first use, takes the session over from any other client."""
        s = RemoteSession(self, {"id": id, "token": token}, video=None)
        s.info()
        return self._track(s)

    def _track(self, s: "RemoteSession") -> "RemoteSession":
        with self._lock:
            self._sessions.add(s)
        return s

    # -- WebSocket --------------------------------------------------------------------------------------------
    def _ws_url(self, session_id: str, token: str) -> str:
        u = urllib.parse.urlsplit(self.base_url)
        scheme = {"http": "ws", "https": "wss"}.get(u.scheme, u.scheme)
        q = {"token": token}
        if self.api_key:
            q["key"] = self.api_key
        path = f"{u.path}/v1/sessions/{urllib.parse.quote(session_id, safe='')}/ws"
        return urllib.parse.urlunsplit((scheme, u.netloc, path, urllib.parse.urlencode(q), ""))

    def close(self) -> None:
        """Disconnect every session's WebSocket (the sessions go on on the server until they end, are closed,
        or reach the idle timeout) and close the HTTP client."""
        with self._lock:
            sessions = list(self._sessions)
            self._sessions = weakref.WeakSet()
        for s in sessions:
            s.disconnect()
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Pipe:
    """A blocking, bounded byte pipe: the reader thread feeds fMP4 bytes, PyAV's demuxer reads them."""

    def __init__(self, limit: int = 8 << 20):
        self._buf = bytearray()
        self._cv = threading.Condition()
        self._eof = False
        self._limit = limit

    def feed(self, data: bytes, abort: threading.Event) -> None:
        with self._cv:
            while len(self._buf) >= self._limit and not self._eof and not abort.is_set():
                self._cv.wait(0.1)
            if self._eof or abort.is_set():
                return
            self._buf += data
            self._cv.notify_all()

    def end(self) -> None:
        with self._cv:
            self._eof = True
            self._cv.notify_all()

    def read(self, n: int = -1) -> bytes:
        with self._cv:
            while not self._buf and not self._eof:
                self._cv.wait()
            if not self._buf:
                return b""
            if n is None or n < 0:
                n = len(self._buf)
            out = bytes(self._buf[:n])
            del self._buf[:n]
            self._cv.notify_all()
            return out


class RemoteSession:
    """One session on the server. Frames: ``frames()`` (or iterate the session) and ``blocks()``; control:
    ``act``, ``set_prompt``, ``pause``, ``resume`` (each returns its ``seq``; ``wait_applied(seq)`` gives the
    block it took effect in), ``fork``, ``snapshot``, ``close``. ``events`` holds the recent JSON events,
    ``state`` the last known state. A context manager: leaving it closes the session."""

    def __init__(self, client: Client, data: dict, video: str | None = None, buffer_frames: int = 256):
        self._client = client
        self.id: str = data["id"]
        self.token: str = data["token"]
        self.state: str | None = data.get("state")
        self.position: int | None = data.get("position")
        self.created: dict = dict(data)
        self.video: str | None = video                # confirmed by the socket's ``media`` event
        self.media: dict | None = None
        self.events: collections.deque = collections.deque(maxlen=512)
        self.block: int | None = None                 # the last ``block`` event's index
        self.end: dict | None = None                  # the ``end`` event, once the session ended
        self._buffer_frames = buffer_frames
        self._seq = itertools.count(1)
        self._lock = threading.Lock()                 # the socket's state and sends
        self._cv = threading.Condition()              # replies to control messages
        self._replies: dict[int, dict[str, dict]] = {}  # seq -> {event type: event}
        self._ws = None
        self._reader: threading.Thread | None = None
        self._decoder: threading.Thread | None = None
        self._pipe: _Pipe | None = None
        self._fmp4_blocks: collections.deque = collections.deque()  # [block event, frames still to come]
        self._cur_block: dict | None = None
        self._frames: queue.Queue = queue.Queue(maxsize=max(1, buffer_frames))
        self._stop = threading.Event()                # drop video, end the helper threads
        self._done = threading.Event()                # the socket closed and the frame queue got its last item
        self._first = threading.Event()               # the socket's first message came (or it closed)
        self._failure: ServerError | None = None      # why the stream ended badly (raised by frames())
        self._closed = False

    # -- HTTP -------------------------------------------------------------------------------------------------
    def _path(self, tail: str = "") -> str:
        return f"/v1/sessions/{urllib.parse.quote(self.id, safe='')}{tail}"

    def info(self) -> dict:
        """``GET /v1/sessions/{id}``: state, position, paused, throttled, frames, block, pages, metrics, ..."""
        d = self._client._request("GET", self._path(), token=self.token)
        self.state = d.get("state", self.state)
        self.position = d.get("position", self.position)
        return d

    # -- the socket -------------------------------------------------------------------------------------------
    def _connected(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def connect(self) -> "RemoteSession":
        """Open the session's WebSocket (done on first use by ``frames``, ``blocks`` and the controls)."""
        with self._lock:
            if self._closed:
                raise ServerError("closed", f"session {self.id} was closed by this client")
            if self._ws is not None:
                return self
            from websockets.sync.client import connect
            from websockets.exceptions import InvalidStatus
            url = self._client._ws_url(self.id, self.token)
            try:
                # entered as a context manager (the form every websockets version supports); closed by
                # disconnect()
                ws = connect(url, open_timeout=self._client.timeout, close_timeout=_JOIN_S, compression=None,
                             max_size=64 << 20, ping_interval=20, ping_timeout=20).__enter__()
            except InvalidStatus as e:
                _raise_for(_WsRefusal(e.response))
                raise
            self._ws = ws
            self._failure = None
            self._stop.clear()
            self._done.clear()
            self._first.clear()
            self._frames = queue.Queue(maxsize=max(1, self._buffer_frames))
            self._reader = threading.Thread(target=self._read_loop, args=(ws,), daemon=True,
                                            name=f"inferix-client-ws-{self.id[:8]}")
            self._reader.start()
        # a refused socket (wrong token, unknown or ended session) is answered at once with an error event and
        # a 44xx close: raise it here rather than from the first read
        self._first.wait(min(2.0, self._client.timeout))
        if self._done.is_set() and self._failure is not None:
            failure = self._failure
            self.disconnect()
            raise failure
        return self

    def _put(self, item) -> None:
        """Into the frame queue; blocks while it is full (backpressure) unless the session is being stopped."""
        while not self._stop.is_set():
            try:
                self._frames.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _read_loop(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed
        close_code = None
        try:
            while True:
                msg = ws.recv()
                if isinstance(msg, str):
                    if self._on_event(msg) != "error":
                        self._first.set()
                else:
                    self._first.set()
                    if not self._stop.is_set():
                        self._on_video(msg)
        except ConnectionClosed as e:
            close_code = e.rcvd.code if e.rcvd is not None else None
        except Exception as e:  # noqa: BLE001 - a decoding error ends this stream, reported by frames()
            self._failure = self._failure or ServerError("client_error", f"{type(e).__name__}: {e}")
            try:
                ws.close()
            except Exception:  # noqa: BLE001
                pass
        finally:
            if self.end is None and self._failure is None and not self._stop.is_set():
                last = self._last_error()
                if close_code is not None and 4400 <= close_code < 4600:  # refused: 4000 + the HTTP status
                    self._failure = ServerError(last.get("code", f"http_{close_code - 4000}"),
                                                last.get("message", f"refused ({close_code})"), close_code - 4000)
                elif close_code == 4001:
                    self._failure = ServerError("replaced", "another client took the session over")
                else:
                    self._failure = ServerError(last.get("code", "disconnected"), last.get(
                        "message", f"the connection closed without an end event (code {close_code})"))
            if self._pipe is not None:  # the decode thread puts the last frames, then the end
                self._pipe.end()
            else:
                self._finish()

    def _finish(self) -> None:
        """The stream is over: the frame queue's last item, and wake whoever waits."""
        self._put(_END)
        self._done.set()
        self._first.set()
        with self._cv:
            self._cv.notify_all()

    def _on_event(self, text: str) -> str | None:
        try:
            ev = json.loads(text)
        except ValueError:
            return None
        if not isinstance(ev, dict):
            return None
        self.events.append(ev)
        kind = ev.get("type")
        if kind == "media":
            self.media = ev
            self.video = ev.get("video", self.video)
        elif kind == "state":
            self.state = ev.get("state", self.state)
            self.position = ev.get("position", self.position)
        elif kind == "block":
            self.block = ev.get("block")
            self._cur_block = ev
            if self.video == "fmp4":
                fr = ev.get("frames") or [0, 0]
                self._fmp4_blocks.append([ev, max(0, int(fr[1]) - int(fr[0]))])
        elif kind == "end":
            self.end = ev
            reason = ev.get("reason")
            if reason in ("finished", "cancelled", "failed"):
                self.state = reason
            if reason not in _ENDED_OK and not self._closed:
                last = self._last_error() if reason == "failed" else {}
                self._failure = ServerError(last.get("code", str(reason)),
                                            last.get("message", f"the session ended: {reason}"))
        seq = ev.get("seq")
        if isinstance(seq, int) and kind in ("ack", "applied", "error", "forked", "snapshot"):
            with self._cv:
                self._replies.setdefault(seq, {})[kind] = ev
                self._cv.notify_all()
        elif kind == "end":
            with self._cv:
                self._cv.notify_all()
        return kind

    def _last_error(self) -> dict:
        """The last ``error`` event that answered no control message (``{}`` if none)."""
        return next((e for e in reversed(self.events) if e.get("type") == "error" and "seq" not in e), {})

    def _on_video(self, data: bytes) -> None:
        video = self.video
        if video is None:  # no media event: tell by the bytes
            video = self.video = "jpeg" if data[:2] == b"\xff\xd8" else "fmp4"
        if video == "jpeg":
            self._put((self._cur_block, _decode_jpeg(data)))
            return
        if self._pipe is None:
            self._pipe = _Pipe()
            self._decoder = threading.Thread(target=self._decode_loop, args=(self._pipe,), daemon=True,
                                             name=f"inferix-client-fmp4-{self.id[:8]}")
            self._decoder.start()
        self._pipe.feed(data, self._stop)

    def _decode_loop(self, pipe: _Pipe) -> None:
        """fMP4 → frames. Probing is off, so the demuxer reads the init segment and then hands out each
        fragment's samples as soon as the fragment is in; one slice-threaded decoder adds no frame delay."""
        import av
        try:
            with av.open(pipe, format="mp4", options={"probesize": "32", "analyzeduration": "0",
                                                      "fpsprobesize": "0"}) as c:
                st = c.streams.video[0]
                st.thread_type = "SLICE"
                for f in c.decode(st):
                    if self._stop.is_set():
                        break
                    self._put((self._next_fmp4_block(), f.to_ndarray(format="rgb24")))
        except Exception as e:  # noqa: BLE001 - reported by frames()
            if not self._stop.is_set():
                self._failure = self._failure or ServerError("bad_video", f"fMP4 decoding failed: {e}")
        finally:
            pipe.end()
            while not self._stop.is_set() and pipe.read(1 << 16):  # the reader thread may still be feeding
                pass
            self._finish()

    def _next_fmp4_block(self) -> dict | None:
        """The block event of the next decoded frame: blocks announce their frame counts, frames come in order."""
        q = self._fmp4_blocks
        while len(q) > 1 and q[0][1] <= 0:
            q.popleft()
        if not q:
            return self._cur_block
        q[0][1] -= 1
        return q[0][0]

    # -- frames -----------------------------------------------------------------------------------------------
    def frames(self, timeout: float | None = None, with_block: bool = False) -> Iterator:
        """Decoded frames, uint8 [H, W, 3], one per frame in order, until the session ends (or is closed).
        ``with_block=True`` yields ``(block_event, frame)`` pairs. ``timeout`` bounds the wait for each frame
        (None: until the socket closes; its keepalive pings notice a dead server). Raises ServerError when the
        session failed, was taken over by another client, or the connection dropped."""
        if self._ws is None and self.end is None:
            self.connect()
        frames = self._frames
        while True:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    item = frames.get(timeout=0.1)
                    break
                except queue.Empty:
                    if self._done.is_set() and frames.empty():
                        item = _END
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"no frame from session {self.id} in {timeout} s") from None
            if item is _END:
                if self._failure is not None and not self._closed:
                    raise self._failure
                return
            ev, frame = item
            yield (ev, frame) if with_block else frame

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.frames()

    def blocks(self, timeout: float | None = None) -> Iterator[tuple[dict, np.ndarray]]:
        """``(block event, uint8 [T, H, W, 3])`` per block, in order (a block whose first frames were already
        taken with ``frames()`` comes with the rest of its frames)."""
        ev, buf = None, []
        for e, frame in self.frames(timeout=timeout, with_block=True):
            if buf and e is not ev:
                yield ev, np.stack(buf)
                buf = []
            ev = e
            buf.append(frame)
            want = (ev["frames"][1] - ev["frames"][0]) if ev and ev.get("frames") else None
            if want is not None and len(buf) >= want:
                yield ev, np.stack(buf)
                ev, buf = None, []
        if buf:
            yield ev, np.stack(buf)

    # -- control ----------------------------------------------------------------------------------------------
    def _send(self, msg: dict) -> int:
        self.connect()
        seq = next(self._seq)
        msg = dict(msg, seq=seq)
        from websockets.exceptions import ConnectionClosed
        try:
            with self._lock:
                ws = self._ws
                if ws is None:
                    raise ServerError("disconnected", f"session {self.id} has no connection")
                ws.send(json.dumps(msg))
        except ConnectionClosed:
            raise self._failure or ServerError("disconnected", f"the connection of session {self.id} is closed") \
                from None
        return seq

    def _wait(self, seq: int, kinds: tuple[str, ...], timeout: float | None) -> dict:
        timeout = self._client.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                got = self._replies.get(seq, {})
                if "error" in got:
                    e = got["error"]
                    raise ServerError(str(e.get("code", "error")), str(e.get("message", "")))
                for k in kinds:
                    if k in got:
                        return got[k]
                if self._done.is_set():
                    raise self._failure or ServerError(
                        "ended", f"session {self.id} ended before message {seq} got {'/'.join(kinds)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {'/'.join(kinds)} for message {seq} of session {self.id} in "
                                       f"{timeout} s (frames not read? the frame queue holds "
                                       f"{self._buffer_frames} frames, then the socket waits)")
                self._cv.wait(min(left, 0.5))

    def act(self, action) -> int:
        """Send an action, held from the session's next block on; returns its seq. A discrete model takes a name
        or id of ``model()["actions"]["values"]``; a keyboard-and-mouse model (``controls["type"] ==
        "keyboard_mouse"``) the held input ``{"keys": "wa" | ["forward", "left"], "mouse": [pitch, yaw]}``
        (either part optional, a missing one is no input; ``None`` releases everything)."""
        return self._send({"type": "act", "action": action})

    def set_prompt(self, prompt: str, recache: bool = False) -> int:
        return self._send({"type": "prompt", "prompt": prompt, "recache": bool(recache)})

    def pause(self) -> int:
        """Pause at the next block boundary; returns the seq."""
        return self._send({"type": "pause"})

    def resume(self) -> int:
        return self._send({"type": "resume"})

    def applied_block(self, seq: int) -> int | None:
        """The block a control message took effect in, if its ``applied`` event came (no waiting)."""
        with self._cv:
            ev = self._replies.get(seq, {}).get("applied")
        return None if ev is None else ev.get("block")

    def wait_ack(self, seq: int, timeout: float | None = None) -> dict:
        """Wait for the ``ack`` of a control message (raises ServerError on its ``error``)."""
        return self._wait(seq, ("ack",), timeout)

    def wait_applied(self, seq: int, timeout: float | None = None) -> int:
        """Wait for the ``applied`` event of a control message; returns its block (its first frame is that
        block's ``frames[0]``). Raises ServerError on the message's ``error``, TimeoutError after ``timeout``
        (default: the client's). The socket is read only while the frame queue has room, so read frames too."""
        return self._wait(seq, ("applied",), timeout).get("block")

    def fork(self, timeout: float | None = None) -> "RemoteSession":
        """A paused copy from the next block boundary (over the socket when connected, else HTTP); call
        ``resume()`` on it (or read its frames after resuming) to run it."""
        if self._connected():
            ev = self._wait(self._send({"type": "fork"}), ("forked",), timeout)
            data = {"id": ev["id"], "token": ev["token"], "state": "paused", "frame": ev.get("frame"),
                    "block": ev.get("block"), "parent": self.id}
        else:
            data = self._client._request("POST", self._path("/fork"), token=self.token)
        return self._client._track(RemoteSession(self._client, data, video=self.video))

    def snapshot(self, timeout: float | None = None) -> dict:
        """Save the session's state at its next block boundary: ``{"snapshot", "bytes", "frame", "block"}``."""
        if self._connected():
            ev = self._wait(self._send({"type": "snapshot"}), ("snapshot",), timeout)
            return {k: ev.get(k) for k in ("snapshot", "bytes", "frame", "block")}
        return self._client._request("POST", self._path("/snapshot"), token=self.token)

    # -- ending -----------------------------------------------------------------------------------------------
    def disconnect(self) -> None:
        """Close the WebSocket and end the helper threads; the session itself goes on on the server."""
        with self._lock:
            ws, self._ws = self._ws, None
        self._stop.set()
        if self._pipe is not None:
            self._pipe.end()
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
        self._join()

    def _join(self) -> None:
        for t in (self._reader, self._decoder):
            if t is not None and t is not threading.current_thread():
                t.join(_JOIN_S)
        self._reader = self._decoder = None
        self._pipe = None
        self._fmp4_blocks.clear()

    def close(self, timeout: float | None = None) -> None:
        """End the session (its KV pages are freed): a ``close`` message when connected (then wait for the
        server's ``end`` and its closing of the socket), else ``DELETE``. Idempotent; threads and socket end."""
        if self._closed:
            return
        self._closed = True
        timeout = self._client.timeout if timeout is None else timeout
        if self._connected() and self.end is None:
            self._stop.set()  # frames no longer wanted: the reader drops them and keeps reading events
            sent = False
            try:
                with self._lock:
                    if self._ws is not None:
                        self._ws.send(json.dumps({"type": "close", "seq": next(self._seq)}))
                        sent = True
            except Exception:  # noqa: BLE001 - the socket broke: fall back to DELETE
                pass
            if sent:
                self._done.wait(timeout)
            if not sent or self.end is None:
                self.disconnect()
                self._delete()
            else:
                self.disconnect()
        elif self.end is None:
            self.disconnect()
            self._delete()
        else:
            self.disconnect()
        if self.state not in ("finished", "failed"):
            self.state = "cancelled"

    def _delete(self) -> None:
        try:
            self._client._request("DELETE", self._path(), token=self.token)
        except ServerError as e:
            if e.status != 404:  # already gone
                raise

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteSession(id={self.id!r}, state={self.state!r}, block={self.block!r})"


class _WsRefusal:
    """An HTTP answer that refused a WebSocket handshake, shaped for ``_raise_for``."""

    def __init__(self, response):
        self.status_code = response.status_code
        self.reason_phrase = getattr(response, "reason_phrase", "")
        body = response.body or b""
        self.text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else str(body)

    def json(self):
        return json.loads(self.text)
