"""The demo's network surface through the real HTTP server (in this process, on a free 127.0.0.1 port), the tiny
model at 32x32: no event handler is public API or callable by name, uploads are bounded, and a client that starts
a stream through the queue and never polls it does not keep it."""
from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from browser_utils import wait_until

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated.*"),
]

HANDLERS = ("on_start", "on_stream", "on_pause", "on_stop", "on_prompt", "on_act", "on_act_3", "on_rewind",
            "on_save", "on_unload")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: bytes | dict | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def server():
    import torch
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from inferix.app.hub import DemoConfig, Hub
    from inferix.app.server import launch
    hub = Hub(DemoConfig(model="tiny", device="cpu", height=32, width=32, max_sessions=2, max_frames=0,
                         snapshots=0, idle_timeout=1.0, max_upload_kib=64))
    demo = None
    try:
        port = _free_port()
        demo = launch(hub, "127.0.0.1", port, block=False, quiet=True)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http(url + "/config")[0] == 200, 30, "the demo server", interval=0.2)
        yield SimpleNamespace(hub=hub, url=url)
    finally:
        if demo is not None:
            demo.close()
        hub.close()
        torch.set_num_threads(threads)


def test_handlers_are_not_listed_as_api(server):
    code, body = http(server.url + "/gradio_api/info")
    assert code == 200
    info = json.loads(body)
    assert info["named_endpoints"] == {} and info["unnamed_endpoints"] == {}
    code, body = http(server.url + "/gradio_api/openapi.json")
    assert code == 200 and b"on_" not in body
    deps = json.loads(http(server.url + "/config")[1])["dependencies"]
    assert deps and all(d["api_visibility"] == "private" for d in deps)


@pytest.mark.parametrize("route", ["call", "call/v2", "run", "api"])
def test_direct_calls_to_handlers_fail(server, route):
    hub = server.hub
    victim = hub.start("victimSessionHash", "a cat runs in the snow", seed=1)
    try:
        sid = victim.session.id
        for name in HANDLERS:
            code, body = http(f"{server.url}/gradio_api/{route}/{name}",
                              {"data": [], "session_hash": "victimSessionHash"})
            assert code == 404, (route, name, code, body[:200])
            hub.stats("victimSessionHash")  # the victim's own page keeps polling
        time.sleep(0.3)  # nothing queued behind the refusals reaches the tab
        hub.stats("victimSessionHash")
        assert victim.session.id == sid and victim.session.status == "running" and victim.action == "none"
    finally:
        hub.close_tab("victimSessionHash")


def test_upload_size_is_limited(server):
    def upload(n: int):
        b = "inferixBoundary"
        body = (f'--{b}\r\nContent-Disposition: form-data; name="files"; filename="x.bin"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + b"\0" * n + f"\r\n--{b}--\r\n".encode()
        try:
            return http(server.url + "/gradio_api/upload", body,
                        {"Content-Type": f"multipart/form-data; boundary={b}"})[0]
        except urllib.error.URLError as e:  # the server answered and closed before reading the whole body
            assert isinstance(e.reason, (ConnectionResetError, BrokenPipeError)), e
            return "reset"
    assert upload(1024) == 200
    assert upload(64 * 1024 + 1) == 413
    assert upload(4 * 2 ** 20) in (413, "reset")


def test_client_that_never_polls_does_not_keep_its_stream(server):
    """A client joins the queue to start a stream (as the page does) but never plays or polls it, nor sends the
    heartbeat: after the idle timeout its tab is closed and its pages are back."""
    hub = server.hub
    deps = json.loads(http(server.url + "/config")[1])["dependencies"]
    start = next(d for d in deps if d["api_name"] == "on_start")
    code, body = http(server.url + "/gradio_api/queue/join",
                      {"fn_index": start["id"], "trigger_id": start["targets"][0][0], "data": ["a cat runs", 0],
                       "event_data": None, "session_hash": "apiClient01"})
    assert code == 200, body
    tab = wait_until(lambda: hub.tabs.get("apiClient01"), 10, "the client's tab")
    wait_until(lambda: tab.frames, 10, "the client's stream to run")
    assert hub.engine.pages_in_use > 0
    t0 = time.monotonic()
    wait_until(lambda: "apiClient01" not in hub.tabs, 10, "the unpolled tab to be closed")
    assert time.monotonic() - t0 < 5
    assert tab.closed and tab.session.status == "cancelled" and tab.frames == []
    assert hub.engine.pages_in_use == 0
