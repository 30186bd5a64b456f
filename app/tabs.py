"""The demo's settings (``DemoConfig``, checked when built) and the state it keeps per browser tab (``Tab``: the
session, the recorded frames, rewind points as ``Snapshot``s); the engine side is ``app.hub``."""
from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inferix.models.mirrors import check_mirrors

__all__ = ["DemoConfig", "Tab", "Snapshot", "SEED_MAX", "parse_seed"]

SEED_MAX = 2 ** 63 - 1


def _short(v, n: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n - 3] + "..."


def parse_seed(value) -> int:
    """The Seed box as an int in [0, SEED_MAX]; a ValueError naming the value otherwise."""
    err = ValueError(f"seed must be a whole number from 0 to {SEED_MAX}, got {_short(value)}")
    if isinstance(value, (bool, np.bool_)):
        raise err
    if isinstance(value, (int, np.integer)):
        n = int(value)
    elif isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or value != math.floor(value):
            raise err
        n = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*\+?\d{1,19}\s*", value):
        n = int(value)
    else:
        raise err
    if not 0 <= n <= SEED_MAX:
        raise err
    return n


@dataclass
class DemoConfig:
    model: str | None = None  # preset or path; None: the embedded default (toy world, else the tiny preset)
    device: str | None = None
    height: int | None = None  # None: the model's
    width: int | None = None
    window: int | None = -1  # latent frames attended; -1: the model's, or 12 when it has none
    sink: int | None = None
    max_sessions: int = 2  # live streams the KV pool holds at once (pool = max_sessions windows)
    kv_pages: int | None = None  # explicit pool size, overrides max_sessions
    max_frames: int = 1200  # pixel frames per session; 0: until stopped
    record_mib: int = 512  # memory per tab for the recording (playback, download); older frames drop first
    snapshots: int = 3  # rewind points kept per tab
    snapshot_every: int = 3  # blocks between rewind points
    max_pixels: int = 832 * 480  # refuse larger frames (width * height)
    threads: int | None = None  # torch CPU threads (None: leave torch's default)
    default_prompt: str | None = None  # None: the model's own (a bundle's "default_prompt"), else GENERIC_PROMPT
    mirrors: tuple = ()  # mirror views run beside every stream (mirror-symmetric worlds: the toy world), e.g. hv,d,a
    idle_timeout: float = 300.0  # s a stream may stay paused/idle, and a tab go without requests; 0: never
    max_queue: int = 8  # tabs that may wait for a stream; a Start beyond that is refused
    max_prompt_chars: int = 2000
    record_mib_total: float = 2048  # memory for the recordings of all tabs together; oldest frames drop first
    max_upload_kib: int = 1024  # request bodies the upload route accepts (the page uploads only a start image)

    def __post_init__(self):
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.max_frames < 0:
            raise ValueError(f"max_frames must be >= 0 (0: until stopped), got {self.max_frames}")
        if self.record_mib < 1:
            raise ValueError(f"record_mib must be >= 1, got {self.record_mib}")
        if self.snapshots < 0 or self.snapshot_every < 1:
            raise ValueError(f"snapshots must be >= 0 and snapshot_every >= 1, got {self.snapshots} and "
                             f"{self.snapshot_every}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if not (self.idle_timeout >= 0 and math.isfinite(self.idle_timeout)):
            raise ValueError(f"idle_timeout must be >= 0 seconds (0: never), got {self.idle_timeout}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}")
        if not (self.record_mib_total > 0 and math.isfinite(self.record_mib_total)):
            raise ValueError(f"record_mib_total must be positive, got {self.record_mib_total}")
        if self.max_upload_kib < 1:
            raise ValueError(f"max_upload_kib must be >= 1, got {self.max_upload_kib}")
        self.mirrors = check_mirrors(self.mirrors)
        for name in ("height", "width", "kv_pages"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")


@dataclass
class Snapshot:
    session: object  # a paused fork (inferix.Session)
    frames: int  # pixel frames delivered when it was taken: the stream continues from here
    block: int
    prompt: str
    action: str
    taken: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return str(self.session.id)

    @property
    def label(self) -> str:
        return f"frame {self.frames} (block {self.block}, {time.strftime('%H:%M:%S', time.localtime(self.taken))})"


class Tab:
    """One browser tab's stream."""

    def __init__(self, key: str):
        self.key = key
        self.lock = threading.Lock()
        self.session = None
        self.frames: list[np.ndarray] = []  # recorded frames [H, W, 3]; frame i of the session is frames[i - base]
        self.frame_times: list[float] = []  # when each recorded frame arrived (the total cap drops the oldest)
        self.base = 0  # frames dropped from the front (the recording is capped by DemoConfig.record_mib)
        self.epoch = 0  # bumped whenever the recording restarts or rewinds: playback jumps to epoch_start
        self.epoch_start = 0
        self.blocks = 0  # blocks delivered on the current line of the story
        self.block_times: deque = deque(maxlen=17)  # (time, frames) per delivered block
        self.snapshots: list[Snapshot] = []  # oldest first
        self.action = "none"
        self.prompt = ""
        self.message = ""
        self.stream_token = 0
        self.closed = False
        self.video_path: Path | None = None
        self.last_seen = time.monotonic()  # the last request from this tab (a handler call or the player)
        self.idle_since: float | None = None  # when its stream stopped running (paused, finished, stopped)

    @property
    def total_frames(self) -> int:
        return self.base + len(self.frames)

    def next_frame(self, pos: int | None, epoch: int | None, max_backlog: int):
        """Playback: the frame to show after ``pos``; skips ahead when more than max_backlog frames wait.

        Returns (frame or None, new pos, epoch, frames still queued)."""
        with self.lock:
            total = self.base + len(self.frames)
            if epoch != self.epoch or pos is None:
                pos, epoch = self.epoch_start, self.epoch
            pos = max(pos, self.base)
            if pos >= total:
                return None, pos, epoch, 0
            if total - pos > max_backlog:
                pos = total - max_backlog
            return self.frames[pos - self.base], pos + 1, epoch, total - pos - 1

    def recorded(self) -> list[np.ndarray]:
        with self.lock:
            return list(self.frames)

    # the recording; callers hold self.lock
    def _record(self, frames, t: float) -> None:
        self.frames.extend(frames)
        self.frame_times.extend([t] * len(frames))

    def _drop_front(self, n: int) -> None:
        del self.frames[:n], self.frame_times[:n]
        self.base += n

    def _restart_recording(self, base: int) -> None:
        self.frames, self.frame_times, self.base = [], [], base
