"""``inferix serve``: one engine behind an HTTP + WebSocket + WebRTC session API (the contract: docs/serve.md).

This module holds the sessions and the engine they share (``Manager``); ``serve_app`` the ASGI application and
its clients (WebSocket, WebRTC).

Threads and loops: one worker thread steps the engine (``EngineThread``, app/stepping.py); the asyncio loop of the ASGI server
owns every network connection. They meet in ``ServeSession``: the worker hands each delivered block over with
``loop.call_soon_threadsafe``; the connection's writer sends it and counts it sent. The worker holds a session still
at a block boundary while ``max_ahead`` of its blocks are unsent (backpressure) and runs the boundary jobs that
need a quiet session (pause, fork, snapshot) there. Engine calls from the network side run in a thread
(``asyncio.to_thread``) under ``Manager.locked()``, which the worker yields to between steps.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import logging
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inferix import AdmissionError
from inferix.plan import DENOISE, RECACHE
from inferix.session import check_seed

from .hub import GENERIC_PROMPT, build_engine, held_input
from .stepping import EngineThread

__all__ = ["ServeConfig", "Manager", "ServeSession", "ServeError"]

log = logging.getLogger("inferix.serve")

ENDED = ("finished", "cancelled", "failed")
VIDEO_KINDS = ("fmp4", "jpeg")
CONTROL_TYPES = ("act", "prompt", "pause", "resume", "fork", "snapshot", "close")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    model: str | None = None
    device: str | None = None
    height: int | None = None
    width: int | None = None
    window: int = -1  # -1: the model's (else 12 with a sink of 3); 0: none
    sink: int | None = None
    max_sessions: int = 4
    kv_pages: int | None = None
    max_queue: int = 16
    max_frames: int = 100000
    idle_timeout: float = 120.0
    max_ahead: int = 2
    max_body_kib: int = 8192
    max_message_kib: int = 64
    max_prompt_chars: int = 2000
    snapshot_dir: str | None = None
    max_snapshots: int = 32
    max_snapshot_mib: int = 1024
    api_key: str | None = None
    threads: int | None = None
    max_pixels: int = 1920 * 1080
    default_prompt: str | None = None
    mirrors: tuple = ()

    def check(self) -> None:
        for name, low in (("max_sessions", 1), ("max_queue", 0), ("max_frames", 1), ("max_ahead", 1),
                          ("max_body_kib", 1), ("max_message_kib", 1), ("max_prompt_chars", 1),
                          ("max_snapshots", 1), ("max_snapshot_mib", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name.replace('_', '-')} must be an int >= {low}, got {v!r}")
        if not (isinstance(self.idle_timeout, (int, float)) and self.idle_timeout >= 0):
            raise ValueError(f"idle-timeout must be a number of seconds >= 0, got {self.idle_timeout!r}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("api-key must have at least 8 characters")


class ServeError(Exception):
    """A request the server refuses: HTTP status, a code from docs/serve.md and a one-line message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _RedactCredentials(logging.Filter):
    """uvicorn logs each WebSocket handshake with its query string: tokens and keys become ***."""

    PATTERN = re.compile(r"\b(token|key)=[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(self.PATTERN.sub(r"\1=***", a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self.PATTERN.sub(r"\1=***", record.msg)
        return True


def redact_credentials_in_logs() -> None:
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactCredentials) for f in logger.filters):
            logger.addFilter(_RedactCredentials())


def _same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode(), b.encode())


# ---- metrics -------------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics in a registry of their own (several servers may live in one process)."""

    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        r = self.registry = CollectorRegistry()
        self.sessions = Gauge("inferix_sessions", "Sessions by state", ["state"], registry=r)
        self.waiting = Gauge("inferix_sessions_waiting", "Sessions waiting for KV pages", registry=r)
        self.pages_used = Gauge("inferix_kv_pages_used", "KV pages in use", registry=r)
        self.pages_total = Gauge("inferix_kv_pages_total", "KV pages in the pool", registry=r)
        self.blocks = Counter("inferix_blocks", "Blocks made for sessions", registry=r)
        self.frames = Counter("inferix_frames", "Pixel frames made for sessions", registry=r)
        self.fps = Gauge("inferix_frames_per_second", "Pixel frames per second, all sessions, last 10 s", registry=r)
        self.bps = Gauge("inferix_blocks_per_second", "Blocks per second, all sessions, last 10 s", registry=r)
        self.ttff = Histogram("inferix_time_to_first_frame_seconds", "Session request to its first block ready to "
                              "send", buckets=self.BUCKETS, registry=r)
        self.block_latency = Histogram("inferix_block_latency_seconds", "Time between a session's consecutive "
                                       "blocks while it runs unthrottled", buckets=self.BUCKETS, registry=r)
        self.control_latency = Histogram("inferix_control_latency_seconds", "Control message received to the "
                                         "block it applies in ready to send", buckets=self.BUCKETS, registry=r)
        self.recent: deque = deque()  # (time, frames) of blocks in the last 10 s

    def block(self, frames: int, now: float) -> None:
        self.blocks.inc()
        self.frames.inc(frames)
        self.recent.append((now, frames))

    def rates(self, now: float) -> tuple[float, float]:
        while self.recent and now - self.recent[0][0] > 10.0:
            self.recent.popleft()
        if not self.recent:
            return 0.0, 0.0
        span = max(1.0, now - self.recent[0][0]) if len(self.recent) > 1 else 10.0
        return sum(n for _, n in self.recent) / span, len(self.recent) / span


# ---- sessions ------------------------------------------------------------------------------------------------
class ServeSession:
    """One engine session as the network sees it: its credentials, its outbox and its counters."""

    def __init__(self, manager: "Manager", sess, video: str, *, created: float, paused: bool = False):
        self.manager = manager
        self.sess = sess  # inferix.Session
        self.id = secrets.token_hex(12)
        self.token = secrets.token_urlsafe(32)
        self.video = video
        self.created = created  # monotonic time of the request
        self.user_paused = paused
        self.throttled = False
        self.unsent = 0  # blocks handed to the outbox and not yet sent (worker and loop: under _count)
        self._count = threading.Lock()
        self.outbox: deque = deque()  # ("event", dict) | ("block", dict, frames); only the loop touches it
        self.wake = asyncio.Event()
        self.client = None  # the attached connection (a WebSocket or WebRTC consumer)
        self.detached_at = time.monotonic()
        self.ended: str | None = None  # end reason, once the end event is queued
        self.ended_at: float | None = None
        self.frames = sess.frames_out  # pixel frames made (the next block's first frame index)
        self.block = sess._seq.block  # the next block's index
        self.meta: deque = deque()  # (block, decode_s, started) of blocks the engine made, in delivery order
        self.block_started: float | None = None  # when its current block began on the engine
        self.pending: list = []  # (seq, received, kind) controls that apply when its next block starts
        self.applied: list = []  # (seq, block, received) controls whose block started in the last step
        self.awaiting: list = []  # (block, received) applied controls whose block is not out yet (latency)
        self.block_started_block: int | None = None
        self.jobs: list = []  # boundary jobs: (kind, seq, future)
        self.first_frame_s: float | None = None
        self.last_block_t: float | None = None
        self.steady = False  # the last gap between blocks had no throttle or pause in it
        self.gaps: deque = deque(maxlen=64)
        self.frame_times: deque = deque(maxlen=64)  # (time, frames) for frames/s
        self.prompt = sess.prompt
        self.action = None
        self.state_key = None  # the last state event sent
        self.sid = sess.id
        self.error: str | None = None

    # -- status, shared by GET and the state event
    @property
    def state(self) -> str:
        st = self.sess.status
        if st == "paused" and not self.user_paused:
            return "running"  # held still by backpressure only
        return st

    def status(self) -> dict:
        m = self.manager
        kv = m.engine.kv
        gaps = sorted(self.gaps)
        ft = list(self.frame_times)
        fps = None
        if len(ft) > 1 and ft[-1][0] > ft[0][0]:
            fps = sum(n for _, n in ft[1:]) / (ft[-1][0] - ft[0][0])
        return {
            "id": self.id, "state": self.state, "position": self.sess.waiting_position,
            "paused": self.user_paused, "throttled": self.throttled, "frames": self.frames, "block": self.block,
            "num_frames": self.sess.num_frames,
            "pages": len(kv.held_pages(self.sid)) if kv.holds(self.sid) else 0,
            "prompt": self.prompt, "action": self.action, "video": self.video,
            "clients": 0 if self.client is None else 1, "error": self.error,
            "metrics": {"time_to_first_frame_s": self.first_frame_s,
                        "block_latency_p50_s": gaps[len(gaps) // 2] if gaps else None,
                        "frames_per_s": fps},
        }

    def key(self) -> tuple:
        return self.state, self.sess.waiting_position, self.user_paused, self.throttled

    def state_event(self) -> dict:
        return {"type": "state", "state": self.state, "position": self.sess.waiting_position,
                "paused": self.user_paused, "throttled": self.throttled}

    # -- the loop side
    def push(self, item) -> None:
        """Queue an event or a block for the client (on the loop)."""
        if item[0] == "event" and sum(1 for i in self.outbox if i[0] == "event") > 256:
            for i, old in enumerate(self.outbox):  # nobody reads: the oldest event goes (blocks never do)
                if old[0] == "event":
                    del self.outbox[i]
                    break
        self.outbox.append(item)
        self.wake.set()

    async def next_item(self):
        while not self.outbox:
            self.wake.clear()
            await self.wake.wait()
        return self.outbox.popleft()

    def block_sent(self) -> None:
        with self._count:
            self.unsent -= 1


# ---- the manager ---------------------------------------------------------------------------------------------
class Manager(EngineThread):
    """The engine, its worker thread, the sessions, the snapshots and the metrics."""

    IDLE_WAIT_S = 0.01

    def __init__(self, cfg: ServeConfig, engine=None):
        cfg.check()
        self.cfg = cfg
        if cfg.threads:
            import torch
            torch.set_num_threads(cfg.threads)
        self.engine = engine if engine is not None else build_engine(cfg)
        eng = self.engine
        self.default_prompt = cfg.default_prompt or eng.bundle.extra.get("default_prompt") or GENERIC_PROMPT
        self.block_pixels = max(1, eng.bundle.pixel_frames(eng.block_frames + 1) - eng.bundle.pixel_frames(1))
        # what steers a session (``{"type": "discrete" | "keyboard_mouse", ...}`` or None) and whether a session
        # opens from a start image: both decide what POST /v1/sessions and the act message accept
        self.controls = eng.adapter.controls()
        self.keyboard_mouse = bool(self.controls) and self.controls.get("type") == "keyboard_mouse"
        self.takes_image = bool(getattr(eng.adapter, "takes_image", False))
        self.sessions: dict[str, ServeSession] = {}  # by public id
        self.by_sid: dict[int, ServeSession] = {}  # by engine session id, while the engine knows it
        self.metrics = Metrics()
        self.kv_pages_total = eng.stats()["kv_pages_total"]
        self.metrics.pages_total.set(self.kv_pages_total)
        self._tmp_snapshots = cfg.snapshot_dir is None
        self.snapshot_dir = Path(cfg.snapshot_dir or tempfile.mkdtemp(prefix="inferix-snapshots-"))
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        self.snapshots: dict[str, Path] = {}  # id -> file, oldest first
        self.loop: asyncio.AbstractEventLoop | None = None
        self._next_reap = 0.0
        self._step_t0 = time.monotonic()
        self._init_stepping("inferix-serve-engine")
        eng.hooks.append(self._on_plan)

    @property
    def alive(self) -> bool:
        """The worker thread runs (False once it died or the manager closed)."""
        return self._thread.is_alive() and not self._stop.is_set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._start_stepping()

    def _post(self, ss: ServeSession, item) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(ss.push, item)

    def _resolve(self, fut, result=None, error: BaseException | None = None) -> None:
        def done():
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(result)
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(done)

    # -- the worker (EngineThread runs the loop)
    def _step_failed(self, e: BaseException) -> None:
        super()._step_failed(e)
        log.exception("engine step failed")

    def _on_plan(self, plan, outs) -> None:
        """Engine hook (inside the step): controls applied by the blocks that just started; block timing."""
        for g in plan.groups:
            if g.kind not in (DENOISE, RECACHE):
                continue
            for row in g.rows:
                ss = self.by_sid.get(row.sid)
                if ss is None or (g.kind == DENOISE and row.step != 0):
                    continue
                if ss.block_started is None or ss.block_started_block != row.block:
                    ss.block_started, ss.block_started_block = self._step_t0, row.block
                ss.applied += [(seq, row.block, received) for seq, received, _ in ss.pending]
                ss.pending = []
        for o in outs:
            ss = self.by_sid.get(o.sid)
            if ss is not None:
                ss.meta.append((o.block, getattr(o, "decode_s", 0.0), ss.block_started))
                ss.block_started = None

    def _before_step(self) -> None:
        self._step_t0 = time.monotonic()  # a block that starts in this step started now
        ahead = self.cfg.max_ahead
        for ss in list(self.by_sid.values()):
            s = ss.sess
            if s.status not in ("running", "paused"):
                continue
            boundary = s.at_block_boundary
            if ss.jobs and boundary:
                self._run_jobs(ss)
            with ss._count:
                behind = ss.unsent >= ahead
            if s.status == "running" and boundary and behind and not ss.throttled:
                s.pause()
                ss.throttled = True
            elif ss.throttled and not behind:
                ss.throttled = False
                if not ss.user_paused:
                    s.resume()

    def _run_jobs(self, ss: ServeSession) -> None:
        jobs, ss.jobs = ss.jobs, []
        for kind, seq, fut in jobs:
            try:
                if kind == "pause":
                    if ss.sess.status == "running":
                        ss.sess.pause()
                    ss.user_paused = True
                    self._resolve(fut, {"seq": seq, "block": ss.sess._seq.block})
                elif kind == "fork":
                    self._resolve(fut, self._fork_now(ss))
                elif kind == "snapshot":
                    self._resolve(fut, self._snapshot_now(ss))
            except Exception as e:  # noqa: BLE001 - the job's caller gets the error
                self._resolve(fut, error=e)

    def _after_step(self) -> None:
        now = time.monotonic()
        m = self.metrics
        for ss in list(self.by_sid.values()):
            s = ss.sess
            for seq, block, received in ss.applied:  # before the blocks: a client learns the block first
                self._post(ss, ("event", {"type": "applied", "seq": seq, "block": block}))
                ss.awaiting.append((block, received))
            ss.applied = []
            for frames in s.poll():
                block, decode_s, started = ss.meta.popleft() if ss.meta else (ss.block, 0.0, None)
                n = len(frames)
                if not n:
                    continue
                meta = {"type": "block", "block": block, "frames": [ss.frames, ss.frames + n],
                        "gen_s": None if started is None else round(now - started, 6),
                        "decode_s": round(decode_s, 6), "t": time.time()}
                for b, received in [a for a in ss.awaiting if a[0] <= block]:
                    m.control_latency.observe(now - received)
                    ss.awaiting.remove((b, received))
                ss.frames += n
                ss.block = block + 1
                with ss._count:
                    ss.unsent += 1
                if ss.first_frame_s is None:
                    ss.first_frame_s = now - ss.created
                    m.ttff.observe(ss.first_frame_s)
                elif ss.last_block_t is not None and ss.steady:
                    ss.gaps.append(now - ss.last_block_t)
                    m.block_latency.observe(now - ss.last_block_t)
                ss.last_block_t = now
                ss.steady = True
                ss.frame_times.append((now, n))
                m.block(n, now)
                self._post(ss, ("block", meta, frames))
            if ss.throttled or ss.user_paused or s.status == "waiting":
                ss.steady = False
            key = ss.key()
            if key != ss.state_key:
                ss.state_key = key
                self._post(ss, ("event", ss.state_event()))
            if s.status in ENDED and not s.pending and not s.blocks:
                reason = s.status
                if s.error is not None:
                    ss.error = f"{type(s.error).__name__}: {s.error}"
                    self._post(ss, ("event", {"type": "error", "code": "generation_failed", "message": ss.error}))
                self._end(ss, reason)

    def _end(self, ss: ServeSession, reason: str) -> None:
        """The session is over: queue its end event (the writer closes the connection after it)."""
        self.by_sid.pop(ss.sid, None)
        if ss.ended is None:
            ss.ended, ss.ended_at = reason, time.monotonic()
            for _, _, fut in ss.jobs:
                self._resolve(fut, error=ServeError(409, "not_allowed", f"session {ss.id} has ended ({reason})"))
            ss.jobs = []
            self._post(ss, ("end", {"type": "end", "reason": reason, "frames": ss.frames}))

    def _maybe_reap(self) -> None:
        now = time.monotonic()
        if now < self._next_reap:
            return
        self._next_reap = now + 0.5
        limit = self.cfg.idle_timeout
        with self.locked():
            for key, ss in list(self.sessions.items()):
                if ss.client is not None:
                    continue
                idle = now - ss.detached_at
                if ss.ended is not None:
                    if now - ss.ended_at > max(limit, 30.0) if limit else now - ss.ended_at > 300:
                        self.sessions.pop(key, None)  # its final status was readable for a while
                    continue
                if limit and idle > limit:
                    log.info("session %s had no client for %.0f s: closed", ss.id, idle)
                    self._cancel(ss, "idle")

    def _cancel(self, ss: ServeSession, reason: str) -> None:
        """End a session now (under the lock): its pages are freed at once."""
        if ss.sess.status not in ENDED:
            ss.sess.cancel()
        ss.sess.poll()
        self._end(ss, reason)

    # -- sessions
    def validate(self, body) -> dict:
        """Check a POST /v1/sessions body (ServeError naming the problem); the parsed request."""
        cfg = self.cfg
        if not isinstance(body, dict):
            raise ServeError(400, "bad_value", "the body must be a JSON object")
        known = {"prompt", "seed", "num_frames", "image", "action", "video", "snapshot"}
        extra = sorted(set(body) - known)
        if extra:
            raise ServeError(400, "bad_value", f"unknown field(s) {extra}; known: {sorted(known)}")
        video = body.get("video", "fmp4")
        if video not in VIDEO_KINDS:
            raise ServeError(400, "bad_value", f"video must be one of {list(VIDEO_KINDS)}, got {video!r}")
        if body.get("snapshot") is not None:
            other = sorted(k for k in body if k not in ("snapshot", "video") and body[k] is not None)
            if other:
                raise ServeError(400, "bad_value", f"a session from a snapshot takes only 'snapshot' and 'video', "
                                                   f"not {other}")
            return {"snapshot": self.snapshot_path(body["snapshot"]), "snapshot_id": body["snapshot"],
                    "video": video}
        # an image-conditioned model reads no prompt (its start image takes the place of one)
        prompt = self.check_prompt(body.get("prompt")) or ("" if self.takes_image else self.default_prompt)
        try:
            seed = check_seed(body.get("seed", 0))
        except ValueError as e:
            raise ServeError(400, "bad_value", str(e)) from None
        n = body.get("num_frames")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= cfg.max_frames):
            raise ServeError(400, "bad_value", f"num_frames must be null (a live session) or an int in "
                                               f"1..{cfg.max_frames}, got {n!r}")
        if n is None and self.engine.window is None:
            raise ServeError(400, "bad_value", "this server runs without a window: live sessions (num_frames null) "
                                               "are not possible; give num_frames")
        action = body.get("action")
        if action is not None:
            self.check_action(action)
        # ``image`` is the start frame of a model that continues frames (the toy world), and the start image
        # (``init_image``) of an image-conditioned model, which cannot start without one
        init, image = "auto", None
        if self.takes_image:
            if body.get("image") is None:
                raise ServeError(400, "bad_value", f"model {self.engine.bundle.name!r} starts from an image: give "
                                                   f"'image', a base64 PNG or JPEG of {self.engine.width}x"
                                                   f"{self.engine.height}")
            image = self._decode_image(body["image"])
        elif body.get("image") is not None:
            init = self._decode_image(body["image"])[None]
        return {"prompt": prompt, "seed": seed, "num_frames": n, "action": action, "init": init, "image": image,
                "video": video}

    def open(self, body: dict, created: float) -> ServeSession:
        """Validate a POST /v1/sessions body and open the session (call in a thread)."""
        cfg = self.cfg
        req = self.validate(body)
        if "snapshot" in req:
            return self._open_snapshot(req, created)
        prompt, seed, n, action, init, image, video = (req[k] for k in ("prompt", "seed", "num_frames", "action",
                                                                         "init", "image", "video"))
        eng = self.engine
        with self.locked():
            waiting = eng.waiting
            try:
                sess = eng.open_session(prompt, num_frames=n, seed=seed, init_frames=init, init_image=image)
            except AdmissionError as e:
                raise ServeError(503, "busy", str(e)) from None
            except (ValueError, TypeError) as e:
                raise ServeError(400, "bad_value", str(e)) from None
            if sess.status == "waiting" and waiting >= cfg.max_queue:
                sess.cancel()
                raise ServeError(503, "busy", f"the KV pool is full and {waiting} session(s) wait already, the most "
                                              f"allowed to wait (--max-queue {cfg.max_queue}): try again later")
            if action is not None:
                sess.act(action)
            ss = self._register(sess, video, created)
            ss.action = self.action_view(action)
        log.info("session %s opened (%s)", ss.id, ss.sess.status)
        return ss

    def _register(self, sess, video: str, created: float, paused: bool = False) -> ServeSession:
        ss = ServeSession(self, sess, video, created=created, paused=paused)
        self.sessions[ss.id] = ss
        self.by_sid[sess.id] = ss
        return ss

    def check_prompt(self, prompt) -> str:
        if prompt is not None and not isinstance(prompt, str):
            raise ServeError(400, "bad_value", f"prompt must be a string, got {type(prompt).__name__}")
        prompt = (prompt or "").strip()
        if len(prompt) > self.cfg.max_prompt_chars:
            raise ServeError(400, "too_large", f"the prompt has {len(prompt)} characters; the limit is "
                                               f"{self.cfg.max_prompt_chars}")
        return prompt

    def check_action(self, action):
        """One action as the model takes it (ServeError naming what is wrong): a name or id of a discrete model, a
        ``{"keys", "mouse"}`` dict (or a string of key letters, or null: no input) of a keyboard-and-mouse one."""
        name = self.engine.bundle.name
        if not self.keyboard_mouse:
            if not self.engine.actions:
                raise ServeError(400, "not_allowed", f"model {name!r} takes no actions")
            if isinstance(action, dict):
                raise ServeError(400, "bad_value", f"model {name!r} takes one discrete action, not a dict of inputs")
        try:
            self.engine.action_id(action)
        except ValueError as e:
            raise ServeError(400, "bad_value", str(e)) from None
        return action

    def action_view(self, action):
        """An action as a session's status reports it. A keyboard-and-mouse action is normalised (whatever spelling
        it came in) to ``{"keys": [held key names], "mouse": [pitch, yaw]}`` (no mouse for keyboard-only models),
        so a client reads back what the model holds; a discrete action is reported as given."""
        return held_input(self.engine, action) if self.keyboard_mouse else action

    def _decode_image(self, data) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError
        if not isinstance(data, str):
            raise ServeError(400, "bad_value", "image must be a base64 string of a PNG or JPEG file")
        if data.startswith("data:"):
            data = data.split(",", 1)[-1]
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ServeError(400, "bad_value", "image is not valid base64") from None
        try:
            with Image.open(io.BytesIO(raw)) as im:
                if im.format not in ("PNG", "JPEG"):
                    raise ServeError(400, "bad_value", f"image must be PNG or JPEG, got {im.format}")
                img = np.array(im.convert("RGB"))  # writable: torch takes it as it is
        except (UnidentifiedImageError, OSError):
            raise ServeError(400, "bad_value", "image is not a readable PNG or JPEG file") from None
        eng = self.engine
        if img.shape[:2] != (eng.height, eng.width):
            raise ServeError(400, "bad_value", f"image is {img.shape[1]}x{img.shape[0]}; this server runs "
                                               f"{eng.width}x{eng.height}")
        return img

    def get(self, sid: str, token: str | None) -> ServeSession:
        ss = self.sessions.get(sid)
        if ss is None:
            raise ServeError(404, "not_found", f"no session {sid!r}")
        if not _same(token, ss.token):
            raise ServeError(403, "forbidden", "this session needs its own token (X-Session-Token or ?token=)")
        return ss

    def delete(self, ss: ServeSession) -> None:
        with self.locked():
            self._cancel(ss, "cancelled")

    async def boundary_job(self, ss: ServeSession, kind: str, seq=None, timeout: float = 60.0):
        """Run a pause, fork or snapshot at the session's next block boundary; returns its result."""
        if ss.ended is not None:
            raise ServeError(409, "not_allowed", f"session {ss.id} has ended ({ss.ended})")
        if ss.sess.status == "waiting" and kind != "pause":
            raise ServeError(409, "not_allowed", f"session {ss.id} waits for KV pages; it can {kind} once it runs")
        fut = asyncio.get_running_loop().create_future()

        def add():
            with self.locked():
                ss.jobs.append((kind, seq, fut))
        await asyncio.to_thread(add)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise ServeError(504, "busy", f"the {kind} did not reach a block boundary within {timeout:g} s") from None

    def _fork_now(self, ss: ServeSession) -> dict:
        try:
            child = ss.sess.fork()
        except RuntimeError as e:
            raise ServeError(503, "busy", str(e)) from None
        c = self._register(child, ss.video, time.monotonic(), paused=True)
        c.prompt, c.action = ss.prompt, ss.action
        c.frames, c.block = ss.sess.frames_out, ss.sess._seq.block
        return {"id": c.id, "token": c.token, "state": "paused", "frame": c.frames, "block": c.block,
                "parent": ss.id}

    def _snapshot_now(self, ss: ServeSession) -> dict:
        sid = secrets.token_hex(16)
        path = self.snapshot_dir / f"{sid}.safetensors"
        try:
            ss.sess.snapshot(path)
        except (RuntimeError, ValueError) as e:
            raise ServeError(409, "not_allowed", f"cannot snapshot session {ss.id}: {e}") from None
        self._keep_snapshot(sid, path)
        return {"snapshot": sid, "bytes": path.stat().st_size, "frame": ss.sess.frames_out,
                "block": ss.sess._seq.block}

    def _keep_snapshot(self, sid: str, path: Path) -> None:
        self.snapshots[sid] = path
        while len(self.snapshots) > self.cfg.max_snapshots:
            old = next(iter(self.snapshots))
            self.snapshots.pop(old).unlink(missing_ok=True)

    def snapshot_path(self, sid: str) -> Path:
        p = self.snapshots.get(sid) if isinstance(sid, str) else None
        if p is None or not p.exists():
            raise ServeError(404, "not_found", f"no snapshot {sid!r}")
        return p

    def upload_snapshot(self, data: bytes) -> str:
        from inferix.snapshot import read_snapshot
        sid = secrets.token_hex(16)
        path = self.snapshot_dir / f"{sid}.safetensors"
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        try:
            read_snapshot(tmp)  # a truncated or edited file is refused before it is kept
        except Exception as e:  # noqa: BLE001 - any failure to read is the upload's fault
            tmp.unlink(missing_ok=True)
            raise ServeError(400, "bad_value", f"not a snapshot: {e}") from None
        tmp.replace(path)
        self._keep_snapshot(sid, path)
        return sid

    def _open_snapshot(self, req: dict, created: float) -> ServeSession:
        path = req["snapshot"]
        with self.locked():
            try:
                sess = self.engine.restore(path)
            except (ValueError, RuntimeError, AdmissionError) as e:
                raise ServeError(409, "not_allowed", f"cannot restore snapshot {req['snapshot_id']}: {e}") from None
            ss = self._register(sess, req["video"], created)
            sess.resume()
        return ss

    # -- controls (WebSocket and data channel)
    async def control(self, ss: ServeSession, msg: dict, reply) -> bool:
        """Handle one control message; ``reply(event)`` sends to this client. False: the client closes."""
        kind = msg.get("type")
        seq = msg.get("seq")
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
            await reply({"type": "error", "code": "bad_message", "message": f"seq must be an int, got {seq!r}"})
            return True
        if kind not in CONTROL_TYPES:
            await reply({"type": "error", "code": "unknown_type", "seq": seq,
                         "message": f"unknown message type {kind!r}; known: {list(CONTROL_TYPES)}"})
            return True
        if ss.ended is not None:
            await reply({"type": "error", "code": "not_allowed", "seq": seq,
                         "message": f"session {ss.id} has ended ({ss.ended})"})
            return kind != "close"
        now = time.monotonic()
        try:
            if kind == "close":
                await reply({"type": "ack", "seq": seq})
                await asyncio.to_thread(self.delete, ss)
                return False
            if kind == "act":
                action = msg.get("action")
                self.check_action(action)
                view = self.action_view(action)

                def act():
                    with self.locked():
                        ss.sess.act(action)
                        ss.action = view
                        ss.pending.append((seq, now, kind))
                await asyncio.to_thread(act)
                await reply({"type": "ack", "seq": seq})
            elif kind == "prompt":
                if self.takes_image:  # its start image takes the place of a prompt: a switch would fail the session
                    raise ServeError(400, "not_allowed", f"model {self.engine.bundle.name!r} is conditioned on its "
                                                         f"start image, not a prompt: it cannot switch prompts")
                prompt = self.check_prompt(msg.get("prompt"))
                if not prompt:
                    raise ServeError(400, "bad_value", "prompt must be a non-empty string")
                recache = msg.get("recache", False)
                if not isinstance(recache, bool):
                    raise ServeError(400, "bad_value", f"recache must be true or false, got {recache!r}")

                def set_prompt():
                    with self.locked():
                        ss.sess.set_prompt(prompt, recache=recache)
                        ss.prompt = prompt
                        ss.pending.append((seq, now, kind))
                await asyncio.to_thread(set_prompt)
                await reply({"type": "ack", "seq": seq})
            elif kind == "resume":
                def resume():
                    with self.locked():
                        ss.user_paused = False
                        if not ss.throttled:
                            ss.sess.resume()
                        return ss.sess._seq.block
                block = await asyncio.to_thread(resume)
                await reply({"type": "ack", "seq": seq})
                await reply({"type": "applied", "seq": seq, "block": block})
            else:  # pause, fork, snapshot: at the next block boundary
                await reply({"type": "ack", "seq": seq})
                res = await self.boundary_job(ss, kind, seq)
                if kind == "pause":
                    await reply({"type": "applied", **res})
                elif kind == "fork":
                    await reply({"type": "forked", "seq": seq, **res})
                else:
                    await reply({"type": "snapshot", "seq": seq, **res})
        except ServeError as e:
            await reply({"type": "error", "code": e.code, "seq": seq, "message": e.message})
        return True

    # -- reporting
    def health(self) -> dict:
        eng = self.engine
        live = [ss for ss in self.sessions.values() if ss.ended is None]
        kv = eng.kv
        live_budget = kv.budget_for(None) if kv.window_frames is not None else None
        free = kv.unreserved
        return {"status": "ok" if not self.step_error else "degraded", "sessions": len(live),
                "waiting": eng.waiting, "kv_pages_used": eng.pages_in_use, "kv_pages_total": self.kv_pages_total,
                "kv_pages_free": free, "session_pages": live_budget,
                "can_admit": eng.waiting == 0 and (live_budget is None or free >= live_budget),
                "error": self.step_error or None}

    def model_info(self) -> dict:
        eng = self.engine
        acts = eng.actions
        return {"name": eng.bundle.name, "height": eng.height, "width": eng.width, "fps": eng.fps,
                "block_frames": eng.block_frames, "block_pixel_frames": self.block_pixels, "window": eng.window,
                "sink": eng.sink, "max_frames": self.cfg.max_frames, "default_prompt": self.default_prompt,
                "actions": self.controls if self.keyboard_mouse else
                ({"type": "discrete", "values": list(acts)} if acts else None),
                "controls": self.controls, "takes_image": self.takes_image,
                "video": list(VIDEO_KINDS), "webrtc": _has_webrtc(), "max_ahead": self.cfg.max_ahead}

    def metrics_text(self) -> bytes:
        from prometheus_client import generate_latest
        m = self.metrics
        counts = {s: 0 for s in ("waiting", "running", "paused", "finished", "cancelled", "failed")}
        for ss in list(self.sessions.values()):
            st = ss.ended or ss.state
            counts[st] = counts.get(st, 0) + 1
        for st, n in counts.items():
            m.sessions.labels(state=st).set(n)
        m.waiting.set(self.engine.waiting)
        m.pages_used.set(self.engine.pages_in_use)
        fps, bps = m.rates(time.monotonic())
        m.fps.set(fps)
        m.bps.set(bps)
        return generate_latest(m.registry)

    # -- shutdown
    async def shutdown(self, reason: str = "server_shutdown", timeout: float = 5.0) -> None:
        """End every session (clients get ``end``), wait briefly for writers to flush, stop the worker."""
        def end_all():
            with self.locked():
                for ss in list(self.sessions.values()):
                    if ss.ended is None:
                        self._cancel(ss, reason)
        await asyncio.to_thread(end_all)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(ss.client is not None for ss in self.sessions.values()):
            await asyncio.sleep(0.05)
        import sys
        if "inferix.app.serve_webrtc" in sys.modules:  # peers still open (their sessions have ended)
            from .serve_webrtc import close_all
            await close_all()
        self.close()

    def close(self) -> None:
        self._stop_stepping()
        if self._tmp_snapshots:
            shutil.rmtree(self.snapshot_dir, ignore_errors=True)


def _has_webrtc() -> bool:
    from .serve_webrtc import AVAILABLE
    return AVAILABLE
