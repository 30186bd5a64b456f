"""A real ``inferix serve`` process of the toy world on a free 127.0.0.1 port, shared by the tests here.

Small limits (3 sessions, short idle timeout) keep it light; it is stopped with SIGTERM (then killed) at the
end. Its output goes to a log file whose tail is shown when it fails to start.
"""
from __future__ import annotations

import time

import pytest

SERVER_ARGS = ["--max-sessions", "3", "--max-queue", "4", "--max-frames", "4000", "--idle-timeout", "30",
               "--max-ahead", "2"]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    from inferix.bench_serve import start_server, stop_server
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log_path, "wb") as log:
        try:
            proc, url = start_server("toyworld", SERVER_ARGS, timeout=120, log=log)
        except RuntimeError as e:
            log.flush()
            tail = log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"{e}\n--- server log ---\n{tail}")
        try:
            yield url
        finally:
            stop_server(proc, timeout=15)


@pytest.fixture
def pages_free():
    """A function: /v1/health once no KV page is in use (or its last answer after ``timeout`` seconds)."""
    def wait(client, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            h = client.health()
            if h["kv_pages_used"] == 0 or time.monotonic() > deadline:
                return h
            time.sleep(0.1)
    return wait
