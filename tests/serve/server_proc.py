"""A real ``inferix serve`` process on a free 127.0.0.1 port, for tests: started with bounded waits, always
stopped (SIGTERM, then SIGKILL)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, model: str = "toyworld", api_key: str | None = None, start_timeout: float = 90,
                 env: dict | None = None, launcher: list | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [*(launcher or [sys.executable]), "-m", "inferix", "serve", "--model", model, "--host", "127.0.0.1", "--port",
               str(self.port), "--threads", "1", "--log-level", "warning", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"inferix-serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.request("GET", "/v1/health", timeout=5)[0] == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        out = self.output()
        self.stop()
        raise RuntimeError(f"the server did not answer within {start_timeout} s:\n{out}")

    def headers(self, token: str | None = None) -> dict:
        h = {}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        if token:
            h["X-Session-Token"] = token
        return h

    def request(self, method: str, path: str, body=None, token: str | None = None, headers=None,
                raw: bytes | None = None, timeout: float = 30):
        """(status, parsed JSON or bytes) of a request; HTTP errors are returned, not raised."""
        h = dict(self.headers(token), **(headers or {}))
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, payload, ctype = r.status, r.read(), r.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, payload, ctype = e.code, e.read(), e.headers.get("content-type", "")
        return status, (json.loads(payload) if "json" in ctype else payload)

    def get(self, path: str, token: str | None = None):
        status, body = self.request("GET", path, token=token, timeout=5)
        if status != 200:
            raise AssertionError(f"GET {path}: {status} {body}")
        return body

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def wait_until(cond, timeout: float, what: str, interval: float = 0.1):
    """Poll cond() until it returns something truthy; fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last value: {last!r})")
