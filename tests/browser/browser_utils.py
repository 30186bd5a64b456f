"""Helpers shared by the browser tests."""
from __future__ import annotations

import time


def wait_until(cond, timeout: float, what: str, interval: float = 0.05):
    """Poll cond() until it returns something truthy; fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last value: {last!r})")
