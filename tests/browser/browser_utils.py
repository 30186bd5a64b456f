"""Helpers shared by the browser tests."""
from __future__ import annotations

import socket
import time
import urllib.request
from contextlib import contextmanager


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_demo(hub):
    """The Gradio demo of ``hub`` served in this process on a free 127.0.0.1 port, up and answering: yields its
    URL; the server and the hub are always shut down."""
    from inferix.app.server import launch
    demo = None
    try:
        port = free_port()
        demo = launch(hub, "127.0.0.1", port, block=False, quiet=True)
        url = f"http://127.0.0.1:{port}/"

        def up():
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_until(up, 30, f"the demo server at {url}", interval=0.2)
        yield url
    finally:
        if demo is not None:
            demo.close()
        hub.close()
