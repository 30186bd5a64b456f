"""The thread that steps an engine for a network front end (the demo's hub, ``inferix serve``'s manager).

One thread runs ``engine.step()`` in a loop under the engine lock, with the front end's hooks around each step.
Request handlers take the lock through ``locked()``, which the stepping thread lets in between steps, so a request
waits at most one step. A failed step never ends the loop: the front end decides what it means for whom.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

__all__ = ["EngineThread"]


class EngineThread:
    """Base for a front end that owns ``self.engine``: call ``_init_stepping(name)``, then ``_start_stepping()``."""

    IDLE_WAIT_S = 0.02  # sleep when the engine had nothing to do
    FAILED_WAIT_S = 0.1  # sleep after a failed step: a failure that repeats is not retried in a tight loop

    def _init_stepping(self, name: str) -> None:
        self.step_error = ""  # the last failed step nobody owns ("" after a good step)
        self._stop = threading.Event()
        self._want = 0  # callers queued for the engine lock
        self._want_lock = threading.Lock()
        self._thread = threading.Thread(target=self._drive, name=name, daemon=True)

    def _start_stepping(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def _stop_stepping(self, timeout: float = 30) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)

    @contextmanager
    def locked(self):
        """The engine lock, taken between steps."""
        with self._want_lock:
            self._want += 1
        try:
            self.engine.lock.acquire()
        finally:
            with self._want_lock:
                self._want -= 1
        try:
            yield
        finally:
            self.engine.lock.release()

    # hooks for the front end (all but _step_failed run under the engine lock)
    def _before_step(self) -> None:
        pass

    def _after_step(self) -> None:
        """Runs after every step, also after a failed one (collect what the sessions delivered and their errors)."""

    def _step_failed(self, e: BaseException) -> None:
        self.step_error = f"{type(e).__name__}: {e}"

    def _maybe_reap(self) -> None:
        """Runs between steps without the lock (take it with ``locked()`` when needed)."""

    def _drive(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            worked = failed = False
            try:
                with eng.lock:
                    self._before_step()
                    try:
                        worked = eng.step()
                    finally:
                        self._after_step()
            except Exception as e:  # noqa: BLE001 - one failed step never ends the front end
                failed = True
                self._step_failed(e)
            else:
                self.step_error = ""
            self._maybe_reap()
            deadline = time.monotonic() + 0.5
            while self._want and time.monotonic() < deadline:  # let request handlers take the lock
                time.sleep(0.001)
            if failed:
                self._stop.wait(self.FAILED_WAIT_S)
            elif not worked:
                self._stop.wait(self.IDLE_WAIT_S)
