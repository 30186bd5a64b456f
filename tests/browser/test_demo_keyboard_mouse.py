"""The streaming demo with a keyboard-and-mouse model that starts from an image (Matrix-Game, the tiny preset), in
headless Chromium: the start image is required, held letter keys tick the key boxes and reach the tab's session,
held arrow keys turn the camera. The Gradio server runs in this process on a free 127.0.0.1 port; every wait is
bounded and the server is always shut down.
"""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from browser_utils import running_demo, wait_until
from PIL import Image

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated.*"),
]


@pytest.fixture(scope="module")
def km_demo():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from inferix.app.hub import DemoConfig, Hub
    hub = Hub(DemoConfig(model="matrix-game-tiny", device="cpu", max_sessions=2, max_frames=20000, snapshots=0,
                         threads=1))
    with running_demo(hub) as url:
        yield hub, url


def picture(h: int, w: int) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 1] = np.linspace(30, 220, w, dtype=np.uint8)[None, :]
    img[h // 3: h // 2, w // 3: w // 2] = (230, 40, 40)
    return img


def test_hub_needs_an_image_and_holds_keys_and_camera(km_demo):
    hub, _ = km_demo
    assert hub.keyboard_mouse and hub.takes_image and hub.mouse and hub.actions == []
    with pytest.raises(ValueError, match="starts from an image"):
        hub.start("hub-test", "", 0)
    assert hub.fit_image(picture(80, 120)).shape == (64, 64, 3)
    tab = hub.start("hub-test", "", 3, image=picture(80, 120))  # any size: fitted
    assert hub.steer("hub-test", keys="wa") == {"keys": ["forward", "left"], "mouse": [0.0, 0.0]}
    assert hub.steer("hub-test", mouse=[0.1, -0.2]) == {"keys": ["forward", "left"], "mouse": [0.1, -0.2]}
    assert hub.steer("hub-test", keys=[]) == {"keys": [], "mouse": [0.1, -0.2]}  # the camera part stays
    with pytest.raises(ValueError, match="unknown key 'z'"):
        hub.steer("hub-test", keys="z")
    with pytest.raises(ValueError, match="is conditioned on its start image"):
        hub.set_prompt("hub-test", "a meadow")
    st = hub.stats("hub-test")
    assert st["input"] == {"keys": [], "mouse": [0.1, -0.2]} and st["action"] == "no keys · camera 0.10, -0.20"
    wait_until(lambda: tab.total_frames > 0, 30, "frames of the hub's stream")
    hub.close_tab("hub-test")


def test_page_image_keys_and_camera(browser, km_demo):
    hub, url = km_demo
    wait_until(lambda: not hub.tabs, 15, "tabs of earlier tests to be closed")
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(15000)
    try:
        page = ctx.new_page()
        page.goto(url, timeout=30000)
        page.wait_for_selector("#start")
        wait_until(lambda: page.evaluate("!!window.__inferixKeys"), 10, "the key handler script")
        assert page.locator("#act-left").count() == 0 and not page.locator("#prompt").is_visible()
        for name in ("forward", "back", "left", "right"):
            assert page.locator(f'#held-keys input[name="{name}"]').count() == 1, name

        page.click("#start")  # no image yet: a message, no stream
        wait_until(lambda: page.locator(".toast-body").filter(has_text="choose a start image").count(), 10,
                   "the missing-image message")
        assert not hub.tabs or all(t.session is None for t in hub.tabs.values())

        buf = io.BytesIO()
        Image.fromarray(picture(90, 120)).save(buf, "PNG")
        page.set_input_files("#start-image input[type=file]",
                             files=[{"name": "start.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
        wait_until(lambda: page.locator("#start-image img").count() > 0, 15, "the start image in the page")
        page.click("#start")
        tab = wait_until(lambda: next((t for t in list(hub.tabs.values()) if t.session is not None), None), 20,
                         "a stream")
        wait_until(lambda: tab.total_frames > 0, 30, "the first frames")

        page.locator("h3").first.click()  # the focus leaves the inputs, keys go to the document
        page.keyboard.down("w")
        wait_until(lambda: tab.action["keys"] == ["forward"], 10, "forward held (W down)")
        assert page.locator('#held-keys input[name="forward"]').is_checked()
        page.keyboard.down("ArrowLeft")
        wait_until(lambda: tab.action == {"keys": ["forward"], "mouse": [0.0, -0.1]}, 10, "turning left")
        wait_until(lambda: "forward" in page.locator('#stats [data-stat="action"]').inner_text(), 10,
                   "the held input in the status line")
        page.keyboard.up("ArrowLeft")
        wait_until(lambda: tab.action["mouse"] == [0.0, 0.0], 10, "the camera steady (arrow up)")
        page.keyboard.up("w")
        wait_until(lambda: tab.action == {"keys": [], "mouse": [0.0, 0.0]}, 10, "no input")
        page.locator("#camera label").filter(has_text="look up").click()  # the camera by a click
        wait_until(lambda: tab.action["mouse"] == [0.1, 0.0], 10, "looking up")
        assert tab.session.status == "running" and tab.message == ""
    finally:
        ctx.close()
    wait_until(lambda: not hub.tabs, 15, "the closed page's tab to be freed")
