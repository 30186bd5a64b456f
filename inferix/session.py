"""A stream's handle: control (prompt, actions, pause, resume, fork, snapshot, cancel) and output (poll, iterate).

The state lives in the engine (scheduler counters, runner tensors, KV pages); a ``Session`` reaches it through
its engine, under the engine's lock.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .scheduler import CANCELLED, FAILED, FINISHED, PAUSED, RUNNING, WAITING, SeqState

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Session", "check_seed"]


def check_seed(seed) -> int:
    """A noise seed: an int in [0, 2**64) (what a torch generator takes)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return int(seed)


class Session:
    """Handle of one stream. Prompt changes and actions take effect at the next block boundary."""

    def __init__(self, engine: "Engine", seq: SeqState, num_frames: int | None):
        self.engine = engine
        self.id = seq.sid
        self._s = seq  # the scheduler's counters; kept after the session ends (its final status)
        self.num_frames = num_frames  # pixel frames to deliver (None: until cancelled)
        self.frames_out = 0
        self.pending = 0  # blocks made whose frames are still being decoded (overlapped decode)
        self.blocks: deque = deque()
        self.error: BaseException | None = None
        self.latents: list = []  # clean latent blocks, kept when the engine is asked to (keep_latents)

    # ---- state -------------------------------------------------------------------------------
    @property
    def _seq(self) -> SeqState:
        return self._s

    @property
    def status(self) -> str:
        return self._seq.status

    @property
    def done(self) -> bool:
        return self.status in (FINISHED, CANCELLED, FAILED) and not self.blocks and not self.pending

    @property
    def waiting_position(self) -> int | None:
        return self.engine.scheduler.waiting_position(self.id)

    @property
    def at_block_boundary(self) -> bool:
        """True between blocks (the last block committed, the next not started): a fork taken now repeats no work."""
        s = self._s
        return s.step == 0 and not s.block_started and not s.prefill_chunks

    @property
    def prompt(self) -> str:
        s = self._seq
        return s.pending_prompt or s.prompt

    # ---- control -----------------------------------------------------------------------------
    def set_prompt(self, prompt: str, recache: bool | None = None) -> None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if not self.engine.adapter.takes_prompt:
            raise ValueError(f"model {self.engine.bundle.name!r} takes no prompt (its sessions are conditioned on "
                             f"their start image)")
        with self.engine.lock:
            s = self._seq
            s.pending_prompt = prompt
            if recache is not None:
                s.recache_on_switch = recache

    def act(self, action) -> None:
        """Hold an action from the next block on: an id or name for a model of named actions, keyboard and mouse
        input for a keyboard-and-mouse model (e.g. ``{"keys": "wa", "mouse": [0.0, 0.1]}``; see docs/matrix-game.md)."""
        eng = self.engine
        held = eng.adapter.latent_condition([eng.action_id(action)])
        with eng.lock:
            self._seq.pending_action = held

    def pause(self) -> None:
        with self.engine.lock:
            host = self.engine.host
            if self._seq.status == RUNNING:
                self._seq.status = PAUSED
            elif host is not None and host.holds(self.id) and self._seq.status == WAITING:
                self.engine.scheduler.unqueue(self.id)

    def resume(self) -> None:
        """Run again. A session whose pages were moved to host memory (``Engine(host_pages=...)``) waits in the
        admission queue like a new session until its budget fits the device again, then continues."""
        with self.engine.lock:
            if self._seq.status == PAUSED:
                host = self.engine.host
                if host is not None and host.holds(self.id):
                    self.engine.scheduler.requeue(self.id)
                else:
                    self._seq.status = RUNNING

    @property
    def offloaded(self) -> bool:
        """Its KV pages are in host memory (paused, or resumed and waiting for device pages)."""
        return self.engine.host is not None and self.engine.host.holds(self.id)

    def cancel(self) -> None:
        with self.engine.lock:
            self.engine._release(self.id, CANCELLED)

    def fork(self) -> "Session":
        """A paused copy that shares this session's KV pages (copy-on-write) and continues from here."""
        return self.engine._fork(self)

    def snapshot(self, path) -> None:
        """Write this session's state (KV pages, decoder stream, noise, counters) to ``path`` (.safetensors); it
        must be at a block boundary. ``Engine.restore(path)`` continues it (see docs/snapshots.md)."""
        from .snapshot import save_session
        if self.offloaded:
            raise RuntimeError(f"session {self.id} is in host memory; resume it (and let it run) before a snapshot")
        save_session(self, path)

    # ---- output ------------------------------------------------------------------------------
    def poll(self) -> list:
        out = []
        while self.blocks:
            out.append(self.blocks.popleft())
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        """Drive the engine until this session is done, yielding its frame blocks."""
        return self.stream()

    def stream(self, between_steps=None) -> Iterator[np.ndarray]:
        """``iter(session)``, with ``between_steps(session)`` called before each engine step (e.g. to snapshot
        the session at a block boundary)."""
        while True:
            while self.blocks:
                yield self.blocks.popleft()
            if self.error is not None:
                raise self.error
            if self.done:
                return
            if self.status == PAUSED:
                raise RuntimeError(f"session {self.id} is paused; resume it before iterating")
            if between_steps is not None:
                between_steps(self)
            self.engine.step()
