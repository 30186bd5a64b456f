"""The demo's back end: one engine, one thread stepping it, one stream per browser tab. No UI code here.

Every tab owns a ``Tab``: its engine session, the frames delivered so far (for playback and the mp4 download) and
its rewind points. A rewind point is a fork of the session taken right after a block was delivered; it stays
paused, sharing KV pages with the stream copy-on-write, until the tab rewinds to it. Each fork reserves a whole
session budget (a window of pages), so rewind points only use pages no live stream needs: none is taken while a
stream waits for pages, and when one waits, rewind points are given up, oldest first, until it fits.

Lock order: ``engine.lock`` before ``Tab.lock``; the playback side takes only ``Tab.lock`` (short, never across a
step), so a frame can be shown while the engine runs the next block.

A keyboard-and-mouse model (Matrix-Game: ``engine.adapter.controls()["type"] == "keyboard_mouse"``) opens its
streams from a start image (``start(..., image=...)``, fitted to the engine's size) and is steered by ``steer``: the
held keys and the camera delta, each part changed on its own, held from the next block on like a toy-world action.

Limits (DemoConfig): a stream paused or idle for ``idle_timeout`` seconds ends and frees its KV pages, rewind
points and recording; a tab that sends no request for that long (a closed page, an API client) is closed. At most
``max_queue`` tabs wait for a stream; prompts are capped at ``max_prompt_chars``; the recordings of all tabs together
stay under ``record_mib_total`` (oldest frames drop first). A failed step ends the sessions it ran; its error is
shown in their tabs only.
"""
from __future__ import annotations

import bisect
import logging
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np

from inferix import AdmissionError, Engine, VideoWriter, default_model

from .stepping import EngineThread
from .tabs import SEED_MAX, DemoConfig, Snapshot, Tab, parse_seed

__all__ = ["DemoConfig", "Hub", "build_engine", "Tab", "Snapshot", "AdmissionError", "DEFAULT_ACTIONS", "SEED_MAX",
           "parse_seed", "held_input", "describe_input"]

log = logging.getLogger("inferix.app")

RUNNING, PAUSED, WAITING = "running", "paused", "waiting"
ENDED = ("finished", "cancelled", "failed")
# Buttons and keys shown for models without actions too (then they are recorded but reach no model input).
DEFAULT_ACTIONS = ["none", "up", "down", "left", "right"]
GENERIC_PROMPT = "a red car drives through a snowy city at night"
STEP_FAILED = "the engine failed a step and retries (details in the server log)"


def held_input(engine, action) -> dict:
    """A keyboard-and-mouse action in one spelling, whatever it came in (``"wa"``, key names, a multi-hot list):
    ``{"keys": [held key names], "mouse": [pitch, yaw]}`` (no ``mouse`` for a keyboard-only model). What a UI shows
    and a status reports back: the input the model holds. ValueError (one line) for an action the model refuses."""
    controls = engine.adapter.controls() or {}
    vec = list(engine.action_id(action))
    names = [k["name"] for k in controls.get("keys", [])]
    out = {"keys": [n for n, v in zip(names, vec) if v]}
    if controls.get("mouse"):
        out["mouse"] = [float(v) for v in vec[len(names):]]
    return out


def describe_input(inp: dict) -> str:
    """A held keyboard-and-mouse input for a status line: ``forward+left · camera 0.00, 0.10``."""
    text = "+".join(inp.get("keys") or []) or "no keys"
    if "mouse" in inp:
        pitch, yaw = inp["mouse"]
        text += f" · camera {pitch:.2f}, {yaw:.2f}"
    return text


def model_options(cfg) -> dict:
    """The model options of a demo or server config: its ``model_options`` (``--model-option``), and its mirror
    views (``--mirrors``, the older spelling of ``--model-option mirrors=...``) when it names any."""
    opts = dict(getattr(cfg, "model_options", None) or {})
    if getattr(cfg, "mirrors", None):
        opts.setdefault("mirrors", cfg.mirrors)
    return opts


def build_engine(cfg, parallel=None) -> Engine:
    """The engine a DemoConfig-like config asks for (model, device, size, window, sink, KV pool for
    ``max_sessions`` streams of ``max_frames``); the demo and ``inferix serve`` both build theirs here."""
    from inferix.defaults import resolve_engine_defaults
    from inferix.models.bundle import load_model
    base = resolve_engine_defaults(device=cfg.device)  # what loading needs
    bundle = load_model(cfg.model or default_model(), device=base.device, dtype=base.dtype)
    if cfg.window in (0, None) and cfg.max_frames == 0:
        raise ValueError("sessions without a frame limit (max_frames 0) need a window")
    # streams run until stopped: a model without a window of its own gets one (12 frames, 3 of them sink), and the
    # pool holds what max_sessions streams reserve
    d = resolve_engine_defaults(bundle, window=cfg.window, sink=cfg.sink, kv_pages=cfg.kv_pages,
                                max_sessions=cfg.max_sessions, device=base.device, dtype=base.dtype,
                                num_frames=cfg.max_frames or None, unbounded_window=(12, 3),
                                start_prompt=cfg.default_prompt or bundle.extra.get("default_prompt") or GENERIC_PROMPT)
    h, w = cfg.height or bundle.height, cfg.width or bundle.width
    if h * w > cfg.max_pixels:
        raise ValueError(f"resolution {w}x{h} is over the limit of {cfg.max_pixels} pixels per frame (--max-pixels)")
    return Engine(bundle, device=d.device, height=h, width=w, window=d.window, sink=d.sink,
                  max_sessions=cfg.max_sessions, kv_pages=d.kv_pages, model_options=model_options(cfg),
                  **({} if parallel is None else {"parallel": parallel}))


class Hub(EngineThread):
    """Owns the engine and the thread that steps it; the UI calls the methods below with a tab key."""

    def __init__(self, config: DemoConfig | None = None, engine: Engine | None = None):
        self.config = cfg = config or DemoConfig()
        if cfg.threads:
            import torch
            torch.set_num_threads(cfg.threads)
        self.engine = engine if engine is not None else build_engine(cfg)
        eng = self.engine
        if eng.height * eng.width > cfg.max_pixels:
            raise ValueError(f"resolution {eng.width}x{eng.height} is over the demo's limit of {cfg.max_pixels} "
                             f"pixels per frame (raise --max-pixels or lower --height/--width)")
        # a keyboard-and-mouse model is steered by held keys and a camera delta (``steer``), not by named actions
        self.controls = eng.adapter.controls()
        self.keyboard_mouse = bool(self.controls) and self.controls.get("type") == "keyboard_mouse"
        self.takes_image = bool(getattr(eng.adapter, "takes_image", False))
        self.keys = list(self.controls.get("keys", [])) if self.keyboard_mouse else []
        self.mouse = bool(self.keyboard_mouse and self.controls.get("mouse"))
        self.model_actions = list(eng.actions) if eng.actions else None
        if self.keyboard_mouse:
            self.actions = []
        else:
            self.actions = [a for a in DEFAULT_ACTIONS if a in self.model_actions] if self.model_actions else \
                list(DEFAULT_ACTIONS)
        if self.model_actions:  # extra actions of a model beyond the five steering ones
            self.actions += [a for a in self.model_actions if a not in self.actions]
        self.fps = eng.fps
        # a world model trained on a small vocabulary streams best from a prompt in its own words
        self.default_prompt = cfg.default_prompt or eng.bundle.extra.get("default_prompt") or GENERIC_PROMPT
        self.block_pixels = max(1, eng.bundle.pixel_frames(eng.block_frames + 1) - eng.bundle.pixel_frames(1))
        self.kv_pages_total = eng.stats()["kv_pages_total"]
        frame_bytes = eng.height * eng.width * 3
        self.record_cap = max(4 * self.block_pixels, cfg.record_mib * 2 ** 20 // frame_bytes)
        self.record_total_cap = max(4 * self.block_pixels, int(cfg.record_mib_total * 2 ** 20) // frame_bytes)
        self.tabs: dict[str, Tab] = {}
        self.delivered: deque = deque(maxlen=65)  # (time, frames) for every block of every tab
        self._next_reap = 0.0
        self._video_dir: Path | None = None  # made at the first download
        self._init_stepping("inferix-demo-engine")
        self._start_stepping()

    # ---- engine ----------------------------------------------------------------------------------------
    def _step_failed(self, e: BaseException) -> None:
        """A step raised. Sessions the engine marked with the error own it: their tabs show it (``_collect``),
        no other tab does. A failure nobody owns is kept in ``step_error`` until a step succeeds."""
        owners = [t.key for t in list(self.tabs.values()) if t.session is not None and t.session.error is e]
        if owners:
            log.exception("engine step failed; ended the stream of %d tab(s)", len(owners))
        else:
            self.step_error = f"{type(e).__name__}: {e}"
            log.exception("engine step failed")

    def _after_step(self) -> None:
        self._collect()

    def _collect(self) -> None:
        """Runs under the engine lock after each step: move delivered frames into tabs, take rewind points."""
        now = time.perf_counter()
        cfg = self.config
        for tab in list(self.tabs.values()):
            s = tab.session
            if s is None:
                continue
            blocks = s.poll()
            if s.error is not None and not tab.message:
                tab.message = f"generation failed: {type(s.error).__name__}: {s.error}"
            if not blocks:
                continue
            n = sum(len(b) for b in blocks)
            with tab.lock:
                for b in blocks:
                    tab._record(b, now)
                if len(tab.frames) > self.record_cap:
                    tab._drop_front(len(tab.frames) - self.record_cap)
            tab.blocks += len(blocks)
            tab.block_times.append((now, n))
            self.delivered.append((now, n))
            if (cfg.snapshots and s.status == RUNNING and tab.blocks % cfg.snapshot_every == 0
                    and not self._anyone_waiting()):
                self._snapshot(tab)
        self._cap_recordings()
        if self._anyone_waiting():
            self._reclaim()

    def _cap_recordings(self) -> None:
        """Keep the recordings of all tabs within ``record_total_cap`` frames: the oldest frames drop first."""
        tabs = list(self.tabs.values())
        excess = sum(len(t.frames) for t in tabs) - self.record_total_cap
        while excess > 0:
            tab = min((t for t in tabs if t.frames), key=lambda t: t.frame_times[0])
            with tab.lock:
                n = min(excess, bisect.bisect_right(tab.frame_times, tab.frame_times[0]))  # that block's frames
                tab._drop_front(n)
            excess -= n

    def _anyone_waiting(self, extra=None) -> bool:
        return (extra is not None and extra.status == WAITING) or \
            any(t.session is not None and t.session.status == WAITING for t in self.tabs.values())

    def _snapshot(self, tab: Tab) -> None:
        s = tab.session
        if s.num_frames is not None and s.num_frames - s.frames_out < self.block_pixels:
            return  # the last block is out: nothing left to branch into
        while len(tab.snapshots) >= self.config.snapshots:
            tab.snapshots.pop(0).session.cancel()
        try:
            child = s.fork()
        except RuntimeError:
            if not tab.snapshots:  # no pages left for a fork: no rewind point this time
                return
            # the pool holds no more forks: move this tab's oldest rewind point here, so the points stay recent
            tab.snapshots.pop(0).session.cancel()
            try:
                child = s.fork()
            except RuntimeError:
                return
        tab.snapshots.append(Snapshot(child, frames=s.frames_out, block=tab.blocks, prompt=s.prompt,
                                      action=tab.action))

    def _reclaim(self, extra=None) -> None:
        """A stream waits for KV pages: give up rewind points, oldest first, until nobody waits."""
        snaps = sorted(((sn.taken, sn, t) for t in self.tabs.values() for sn in t.snapshots), key=lambda x: x[0])
        for _, sn, t in snaps:
            if not self._anyone_waiting(extra):
                return
            sn.session.cancel()  # frees its pages; the scheduler admits waiting sessions at once
            t.snapshots.remove(sn)

    def _maybe_reap(self) -> None:
        limit = self.config.idle_timeout
        now = time.monotonic()
        if not limit or now < self._next_reap:
            return
        self._next_reap = now + min(1.0, limit / 4)
        with self.engine.lock:
            self._reap(now)

    def _reap(self, now: float) -> None:
        """End what nobody uses (runs under the engine lock): a tab without requests for ``idle_timeout`` seconds
        is closed; a stream paused or idle that long ends, freeing its pages, rewind points and recording."""
        limit = self.config.idle_timeout
        for key, tab in list(self.tabs.items()):
            if now - tab.last_seen > limit:
                log.info("closing a tab that sent no request for %.0f s", now - tab.last_seen)
                self.tabs.pop(key, None)
                self._end_tab(tab)
                continue
            s = tab.session
            if s is not None and s.status in (RUNNING, WAITING):
                tab.idle_since = None
                continue
            if tab.idle_since is None:
                tab.idle_since = now
                continue
            paused = s is not None and s.status == PAUSED
            if now - tab.idle_since <= limit or not (paused or tab.snapshots or tab.frames):
                continue
            # the stream's status changes last: a page polling without the engine lock that sees it ended sees the
            # message and the dropped recording too
            tab.message = (f"the stream was {'paused' if paused else 'idle'} for over {limit:g} s and has ended, "
                           f"freeing its KV pages, rewind points and recording: press Start for a new one")
            self._drop_recording(tab)
            self._end_session(tab)

    def _drop_recording(self, tab: Tab) -> None:
        with tab.lock:
            tab._restart_recording(tab.total_frames)
            tab.epoch += 1
            tab.epoch_start = tab.base
        self._drop_video(tab)

    def _drop_video(self, tab: Tab) -> None:
        path, tab.video_path = tab.video_path, None
        if path is None:
            return
        if self._video_dir is not None and path.parent.parent == self._video_dir:
            shutil.rmtree(path.parent, ignore_errors=True)  # the download's own folder
        else:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the stepping thread and end every session."""
        self._stop_stepping()
        with self.engine.lock:
            for key in list(self.tabs):
                self._end_tab(self.tabs.pop(key))
        if self._video_dir is not None:
            shutil.rmtree(self._video_dir, ignore_errors=True)

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    # ---- tabs ------------------------------------------------------------------------------------------
    def tab(self, key: str) -> Tab:
        """The tab for ``key`` (made on first use); a call counts as a request from that tab."""
        t = self.tabs.get(key)
        if t is None:
            with self.locked():
                t = self.tabs.get(key)
                if t is None:
                    t = self.tabs[key] = Tab(key)
                    if self.keyboard_mouse:  # no keys held, the camera still
                        t.action = held_input(self.engine, None)
        t.last_seen = time.monotonic()
        return t

    @staticmethod
    def _end_session(tab: Tab) -> None:
        for sn in tab.snapshots:
            sn.session.cancel()
        tab.snapshots = []
        if tab.session is not None and tab.session.status not in ENDED:
            tab.session.cancel()

    def _end_tab(self, tab: Tab) -> None:
        tab.closed = True
        self._end_session(tab)
        with tab.lock:
            tab._restart_recording(tab.total_frames)
        self._drop_video(tab)

    def _clean_prompt(self, prompt) -> str:
        """The prompt stripped; ValueError when it is not text or longer than ``max_prompt_chars``."""
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"the prompt must be text, got {type(prompt).__name__}")
        prompt = (prompt or "").strip()
        limit = self.config.max_prompt_chars
        if len(prompt) > limit:
            raise ValueError(f"the prompt has {len(prompt)} characters; the limit is {limit}")
        return prompt

    def fit_image(self, image) -> np.ndarray:
        """A picture as the start image of a stream: uint8 RGB at the engine's size, centre-cropped to its aspect
        ratio and scaled (the demo takes any picture; ``inferix serve`` wants exactly the size). ValueError for
        something that is no picture."""
        from PIL import Image, ImageOps
        a = np.asarray(image)
        if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)) \
                or 0 in a.shape:
            raise ValueError(f"the start image must be a uint8 picture [H, W] or [H, W, 3|4], got {a.dtype} "
                             f"{list(a.shape)}")
        if a.ndim == 3 and a.shape[-1] != 3:
            a = a[..., :3] if a.shape[-1] == 4 else a[..., 0]
        im = Image.fromarray(np.ascontiguousarray(a)).convert("RGB")
        size = (self.engine.width, self.engine.height)
        if im.size != size:
            im = ImageOps.fit(im, size, Image.Resampling.BICUBIC)
        return np.array(im, dtype=np.uint8)

    def start(self, key: str, prompt: str, seed: int = 0, image=None) -> Tab:
        """(Re)start the tab's stream; the session waits for pages when the pool is full, unless ``max_queue``
        tabs wait already (then AdmissionError). A bad seed or prompt raises ValueError and changes nothing.
        ``image``: the start image of an image-conditioned model (required there; any size, see ``fit_image``)."""
        prompt = self._clean_prompt(prompt) or ("" if self.takes_image else self.default_prompt)
        seed = parse_seed(seed)
        if self.takes_image:
            if image is None:
                raise ValueError(f"model {self.engine.bundle.name} starts from an image: choose a start image, "
                                 f"then press Start")
            image = self.fit_image(image)
        elif image is not None:
            raise ValueError(f"model {self.engine.bundle.name} takes no start image")
        with self.locked():
            tab = self.tab(key)
            self._end_session(tab)
            tab.message = ""
            waiting = sum(1 for t in self.tabs.values()
                          if t is not tab and t.session is not None and t.session.status == WAITING)
            sess = self.engine.open_session(prompt, num_frames=self.config.max_frames or None, seed=seed,
                                            init_image=image)
            if sess.status == WAITING:
                self._reclaim(extra=sess)  # rewind points give way to a new stream at once
                if sess.status == WAITING and waiting >= self.config.max_queue:
                    sess.cancel()
                    raise AdmissionError(f"all streams are busy and {waiting} tab(s) wait already, the most allowed "
                                         f"to wait is {self.config.max_queue}: try again later")
            if self.keyboard_mouse:
                sess.act(tab.action)  # what the tab holds goes on in the new stream
            elif self.model_actions and tab.action != "none":
                sess.act(tab.action)
            with tab.lock:
                tab.session = sess
                tab._restart_recording(0)
                tab.epoch += 1
                tab.epoch_start = 0
            tab.blocks = 0
            tab.block_times.clear()
            tab.idle_since = None
            tab.prompt = prompt
            return tab

    def set_prompt(self, key: str, prompt: str) -> bool:
        """Switch the running stream's prompt at its next block; False when there is nothing to switch."""
        prompt = self._clean_prompt(prompt)
        if not prompt:
            return False
        if self.takes_image:  # the start image takes the prompt's place: a switch would fail the stream
            raise ValueError(f"model {self.engine.bundle.name} is conditioned on its start image, not a prompt")
        with self.locked():
            tab = self.tab(key)
            s = tab.session
            if s is None or s.status in ENDED:
                return False
            s.set_prompt(prompt)
            tab.prompt = prompt
            return True

    def act(self, key: str, action) -> None:
        """Hold an action from the next block on (recorded only, for models without actions). A keyboard-and-mouse
        model takes the whole input (``{"keys", "mouse"}``, see ``steer``)."""
        if self.keyboard_mouse:
            self._hold(key, held_input(self.engine, action))
            return
        if action not in self.actions:
            raise ValueError(f"unknown action {action!r}; known: {self.actions}")
        with self.locked():
            tab = self.tab(key)
            tab.action = action
            s = tab.session
            if self.model_actions and s is not None and s.status not in ENDED:
                s.act(action)

    def steer(self, key: str, keys=None, mouse=None) -> dict:
        """Keyboard-and-mouse models: hold these keys (a string of letters or a list of names; ``[]`` releases all)
        and/or this camera delta ``[pitch, yaw]`` per frame from the next block on; a part not given stays as it
        is, so the keys and the camera can come from different controls. Returns the input now held."""
        if not self.keyboard_mouse:
            raise ValueError(f"model {self.engine.bundle.name} is not steered by keys and mouse")
        with self.locked():  # the part not given is read and written back under the lock: no update is lost
            tab = self.tab(key)
            cur = tab.action if isinstance(tab.action, dict) else {}
            action = {"keys": cur.get("keys", []) if keys is None else keys}
            if mouse is not None:
                action["mouse"] = list(mouse) if isinstance(mouse, (list, tuple)) else mouse  # checked below
            elif self.mouse:
                action["mouse"] = cur.get("mouse", [0.0, 0.0])
            return self._hold(key, held_input(self.engine, action))

    def _hold(self, key: str, inp: dict) -> dict:
        with self.locked():
            tab = self.tab(key)
            tab.action = inp
            s = tab.session
            if s is not None and s.status not in ENDED:
                s.act(inp)
        return inp

    def toggle_pause(self, key: str) -> str:
        with self.locked():
            tab = self.tab(key)
            s = tab.session
            if s is None:
                return "idle"
            tab.idle_since = None  # a pause counts from now
            if s.status == RUNNING:
                s.pause()
            elif s.status == PAUSED:
                s.resume()
                tab.block_times.clear()  # the pause is no block latency: measure afresh
            return s.status

    def stop(self, key: str) -> None:
        """End the stream and free its pages (rewind points too); the recording stays for download."""
        with self.locked():
            tab = self.tab(key)
            self._end_session(tab)

    def rewind(self, key: str, snapshot_id: str | None = None) -> Snapshot:
        """Continue from a rewind point (default: the newest) as the tab's stream; the current one ends."""
        with self.locked():
            tab = self.tab(key)
            if not tab.snapshots:
                raise ValueError("no rewind point yet: they are taken every "
                                 f"{self.config.snapshot_every} blocks while a stream runs and KV pages are free")
            idx = len(tab.snapshots) - 1
            if snapshot_id not in (None, ""):
                ids = [sn.id for sn in tab.snapshots]
                if str(snapshot_id) not in ids:
                    raise ValueError(f"rewind point {snapshot_id!r} is gone (kept: {ids})")
                idx = ids.index(str(snapshot_id))
            chosen = tab.snapshots[idx]
            for later in tab.snapshots[idx + 1:]:  # they lie on the story being abandoned
                later.session.cancel()
            tab.snapshots = tab.snapshots[:idx]
            if tab.session is not None and tab.session.status not in ENDED:
                tab.session.cancel()
            chosen.session.resume()
            with tab.lock:
                tab.session = chosen.session
                if chosen.frames >= tab.base:
                    del tab.frames[chosen.frames - tab.base:], tab.frame_times[chosen.frames - tab.base:]
                else:  # the recording no longer reaches back to this point: it restarts there
                    tab._restart_recording(chosen.frames)
                tab.epoch += 1
                tab.epoch_start = chosen.frames
            tab.blocks = chosen.block
            tab.block_times.clear()
            tab.idle_since = None
            tab.prompt = chosen.prompt
            tab.action = chosen.action
            tab.message = ""
            return chosen

    def close_tab(self, key: str) -> None:
        """The browser tab went away: end its streams and drop its recording."""
        with self.locked():
            tab = self.tabs.pop(key, None)
            if tab is not None:
                self._end_tab(tab)

    def write_video(self, key: str) -> Path | None:
        """The tab's recording as an mp4 (None before the first frame), replacing its earlier one.

        The file is named by the time only, in a random folder of its own: the name says nothing of the tab."""
        tab = self.tab(key)
        frames = tab.recorded()
        if not frames:
            return None
        if self._video_dir is None:
            self._video_dir = Path(tempfile.mkdtemp(prefix="inferix-demo-"))
        self._drop_video(tab)
        path = Path(tempfile.mkdtemp(dir=self._video_dir)) / f"inferix-{time.strftime('%Y%m%d-%H%M%S')}.mp4"
        with VideoWriter(path, fps=self.fps) as w:
            w.write(np.stack(frames))
        tab.video_path = path
        return path

    # ---- stats -----------------------------------------------------------------------------------------
    @staticmethod
    def _rate(times) -> float | None:
        """Frames per second over the blocks in ``times`` (the first block only marks the start)."""
        t = list(times)
        if len(t) < 2 or t[-1][0] <= t[0][0]:
            return None
        return sum(n for _, n in t[1:]) / (t[-1][0] - t[0][0])

    def stats(self, tab: str | Tab) -> dict:
        """A snapshot of a tab's state for the status line; lock-free reads (values may be one step old).

        Given a Tab it never creates one, so a player that outlives its closed tab leaves nothing behind."""
        if not isinstance(tab, Tab):
            tab = self.tab(tab)
        tab.last_seen = time.monotonic()
        s = tab.session
        status = "idle" if s is None else s.status
        waiting = sum(1 for t in list(self.tabs.values()) if t.session is not None and t.session.status == WAITING)
        pos = s.waiting_position if (s is not None and status == WAITING) else None
        bt = list(tab.block_times)
        gaps = sorted(b[0] - a[0] for a, b in zip(bt, bt[1:]))
        return {
            "status": status,
            "waiting": waiting,
            "waiting_position": pos,
            "frames": tab.total_frames,
            "max_frames": self.config.max_frames,
            "blocks": tab.blocks,
            "pixel_fps": self._rate(bt),
            "engine_pixel_fps": self._rate(self.delivered),
            "block_latency_p50_s": gaps[len(gaps) // 2] if gaps else None,
            "kv_pages_in_use": self.engine.pages_in_use,
            "kv_pages_total": self.kv_pages_total,
            "action": describe_input(tab.action) if isinstance(tab.action, dict) else tab.action,
            "input": tab.action if isinstance(tab.action, dict) else None,
            "actions_reach_model": bool(self.model_actions) or self.keyboard_mouse,
            "prompt": tab.prompt,
            "session_id": None if s is None else s.id,
            "snapshots": [(sn.label, sn.id) for sn in list(tab.snapshots)],
            "message": tab.message or (STEP_FAILED if self.step_error and status in (RUNNING, WAITING) else ""),
        }

