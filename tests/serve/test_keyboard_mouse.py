"""``inferix serve`` with a keyboard-and-mouse model that starts from an image (Matrix-Game, the tiny preset): a
real server process on 127.0.0.1, a start image over HTTP, held keys and camera deltas over the WebSocket.

That an action reaches the engine is checked by its frames: forks of one paused session continue from the same
block boundary, so the same held input (in any spelling) gives the same frames and another input other frames.
The refusals of a keyboard-only variant and of a discrete model are checked in process (``Manager``), without a
server.
"""
from __future__ import annotations

import asyncio
import base64
import io
import time

import numpy as np
import pytest
from PIL import Image
from server_proc import ServerProcess, wait_until
from test_api import Conn, jpeg_frames

MODEL = "matrix-game-tiny"
KEYS = [{"name": "forward", "letter": "w"}, {"name": "back", "letter": "s"}, {"name": "left", "letter": "a"},
        {"name": "right", "letter": "d"}]


def png_b64(img: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def start_image(h: int = 64, w: int = 64) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :, 2] = np.linspace(40, 220, w, dtype=np.uint8)[None, :]
    img[h // 4: h // 2, w // 4: w // 2] = (220, 60, 30)
    return img


@pytest.fixture(scope="module")
def srv():
    with ServerProcess("--max-sessions", "4", "--max-queue", "2", "--idle-timeout", "30", "--max-frames", "400",
                       model=MODEL) as s:
        yield s


def open_km(srv, **body) -> dict:
    body.setdefault("image", png_b64(start_image()))
    status, r = srv.request("POST", "/v1/sessions", body)
    assert status == 201, (status, r)
    return r


def err(status_body, status: int, code: str, text: str) -> None:
    st, body = status_body
    assert st == status, (st, body)
    assert body["error"]["code"] == code and text in body["error"]["message"], body


def pages_free(srv, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = srv.get("/v1/health")
        if (h["kv_pages_used"] == 0 and h["sessions"] == 0) or time.monotonic() > deadline:
            return h
        time.sleep(0.1)


def test_model_reports_controls_and_image(srv):
    m = srv.get("/v1/model")
    want = {"type": "keyboard_mouse", "keys": KEYS, "mouse": True}
    assert m["controls"] == want and m["actions"] == want, m
    assert m["takes_image"] is True and (m["width"], m["height"]) == (64, 64)


def test_bad_image_and_bad_input_are_refused(srv):
    good = png_b64(start_image())
    for route in ("/v1/sessions", "/v1/sessions/check"):
        err(srv.request("POST", route, {"num_frames": 12}), 400, "bad_value", "starts from an image")
        err(srv.request("POST", route, {"image": png_b64(start_image(32, 48))}), 400, "bad_value", "48x32")
        _, r = srv.request("POST", route, {"image": png_b64(start_image(32, 48))})
        assert "64x64" in r["error"]["message"] and "\n" not in r["error"]["message"], r
        err(srv.request("POST", route, {"image": "@@@"}), 400, "bad_value", "base64")
        err(srv.request("POST", route, {"image": good, "action": {"keys": "z"}}), 400, "bad_value", "unknown key 'z'")
        err(srv.request("POST", route, {"image": good, "action": {"mouse": [0.1]}}), 400, "bad_value", "mouse")
        err(srv.request("POST", route, {"image": good, "action": {"keys": "w", "wheel": 1}}), 400, "bad_value",
            "wheel")
    assert srv.request("POST", "/v1/sessions/check", {"image": good, "action": {"keys": "wa", "mouse": [0, .1]}}) \
        == (200, {"ok": True})
    # a JPEG start image works as well (nothing opened above)
    s = open_km(srv, image=png_b64(start_image(), "JPEG"), num_frames=12, video="jpeg",
                action={"keys": ["forward", "left"], "mouse": [0.05, -0.1]})
    st = srv.get(f"/v1/sessions/{s['id']}", token=s["token"])
    assert st["action"] == {"keys": ["forward", "left"], "mouse": [0.05, -0.1]}, st
    c = Conn(srv, s)
    c.event("end", reason="finished")
    assert jpeg_frames(c).shape == (12, 64, 64, 3)
    h = pages_free(srv)
    assert h["kv_pages_used"] == 0 and h["sessions"] == 0, h


def test_keys_and_mouse_over_the_websocket_reach_the_engine(srv):
    parent = open_km(srv, seed=5, num_frames=None, video="jpeg")
    pc = Conn(srv, parent)
    pc.send(type="pause", seq=1)
    pc.event("applied", seq=1)
    forks = []
    for _ in range(3):
        status, f = srv.request("POST", f"/v1/sessions/{parent['id']}/fork", token=parent["token"])
        assert status == 201, f
        forks.append(f)
    assert len({(f["frame"], f["block"]) for f in forks}) == 1, forks  # one boundary for all
    inputs = [{"keys": "w", "mouse": [0.0, 0.3]},                  # forward, turning right
              {"keys": ["forward"], "mouse": [0.0, 0.3]},          # the same input, spelled otherwise
              {"keys": [0, 1, 0, 1], "mouse": [0.3, 0.0]}]         # back + right, looking up
    runs = []
    for f, action in zip(forks, inputs):  # one at a time: each fork runs alone, as the others wait paused
        c = Conn(srv, f)
        c.send(type="act", action=action, seq=2)
        c.event("ack", seq=2)
        c.send(type="resume", seq=3)
        applied = c.seen("applied", seq=2)
        assert applied["block"] == f["block"], (applied, f)  # held from the fork's first block on
        c.until(lambda e: e["type"] == "block" and e["block"] >= f["block"] + 1)
        c.until(lambda e: e["type"] == "block" and e["block"] >= f["block"] + 2)  # the block's frames are in
        st = srv.get(f"/v1/sessions/{f['id']}", token=f["token"])
        frames = np.stack([np.asarray(Image.open(io.BytesIO(b))) for blk, b in c.binary
                           if blk is not None and f["block"] <= blk < f["block"] + 2]).astype(int)
        assert frames.shape == (24, 64, 64, 3), frames.shape
        runs.append((frames, st["action"]))
        c.send(type="close", seq=4)
        c.event("end", reason="cancelled")
    assert runs[0][1] == runs[1][1] == {"keys": ["forward"], "mouse": [0.0, 0.3]}, runs[0][1]
    assert runs[2][1] == {"keys": ["back", "right"], "mouse": [0.3, 0.0]}, runs[2][1]
    same = np.abs(runs[0][0] - runs[1][0]).max()
    other = np.abs(runs[0][0] - runs[2][0]).mean()
    assert same <= 2, same  # the same input: the same frames (JPEG of equal pixels)
    assert other > 1.0, other  # another input: other frames

    # bad input over the socket: an error for that message, the session goes on
    pc.send(type="act", action={"keys": "q"}, seq=5)
    e = pc.event("error", seq=5)
    assert e["code"] == "bad_value" and "unknown key 'q'" in e["message"], e
    pc.send(type="act", action="forward", seq=6)  # a string is read as key letters
    assert pc.event("error", seq=6)["code"] == "bad_value"
    pc.send(type="prompt", prompt="a meadow", seq=7)  # the start image takes the prompt's place
    assert pc.event("error", seq=7)["code"] == "not_allowed"
    pc.send(type="act", action=None, seq=8)  # no input
    pc.event("ack", seq=8)
    assert srv.get(f"/v1/sessions/{parent['id']}", token=parent["token"])["action"] == \
        {"keys": [], "mouse": [0.0, 0.0]}
    pc.send(type="close", seq=9)
    pc.event("end", reason="cancelled")
    h = pages_free(srv)
    assert h["kv_pages_used"] == 0 and h["sessions"] == 0, h


def test_python_client_image_path_and_keys_mouse(srv, tmp_path):
    from inferix.client import Client, ServerError
    path = tmp_path / "start.png"
    Image.fromarray(start_image()).save(path)
    with Client(srv.url, timeout=20) as client:
        m = client.model()
        assert m["takes_image"] and m["controls"]["type"] == "keyboard_mouse"
        with pytest.raises(ServerError) as e:
            client.open(image=start_image(32, 32))
        assert e.value.status == 400 and "64x64" in e.value.message
        with client.open(image=path, seed=2, num_frames=36, video="jpeg") as s:  # a path, no prompt
            frames = s.frames(timeout=20)
            next(frames)
            seq = s.act({"keys": "wd", "mouse": [-0.1, 0.2]})
            block = s.wait_applied(seq)
            assert block >= 1 and s.info()["action"] == {"keys": ["forward", "right"], "mouse": [-0.1, 0.2]}
            with pytest.raises(ServerError) as e:
                s.wait_ack(s.act({"keys": "wz"}))
            assert e.value.code == "bad_value" and "unknown key 'z'" in e.value.message
            assert 1 + sum(1 for _ in frames) == 36
    h = pages_free(srv)
    assert h["kv_pages_used"] == 0, h

# ---- in process: a keyboard-only variant, and a discrete model ------------------------------------------------
def _templerun_tiny_engine():
    """A tiny random Matrix-Game of the templerun layout (7 keys, no mouse), at 64x64."""
    import torch
    from inferix import Engine
    from inferix.models.clip_vision import CLIPVisionEncoder
    from inferix.models.matrixgame.bundle import build_bundle, release_config
    from inferix.models.matrixgame.dit import MatrixGameDiT
    from inferix.models.vae import WanVAE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dit = MatrixGameDiT(release_config("templerun", tiny=True))
    bundle = build_bundle(dit, name="templerun-tiny", decoder=WanVAE.tiny(seed=0),
                          image_encoder=CLIPVisionEncoder.random("tiny", seed=0), height=64, width=64)
    return Engine(bundle, device="cpu", window=bundle.window, max_sessions=1)


def test_keyboard_only_model_refuses_mouse():
    from inferix.app.serve import Manager, ServeConfig, ServeError
    mgr = Manager(ServeConfig(max_sessions=1), engine=_templerun_tiny_engine())
    try:
        info = mgr.model_info()
        assert info["takes_image"] is True and info["controls"]["mouse"] is False
        assert [k["letter"] for k in info["controls"]["keys"]] == list("qwszcad")
        body = {"image": png_b64(start_image()), "num_frames": 12, "action": {"keys": "w", "mouse": [0.1, 0.0]}}
        with pytest.raises(ServeError) as e:
            mgr.validate(body)
        assert e.value.status == 400 and "takes no mouse input" in e.value.message, e.value.message
        ss = mgr.open(dict(body, action={"keys": "wz"}), time.monotonic())
        assert ss.action == {"keys": ["jump", "turnleft"]}  # no mouse field for a keyboard-only model
        replies = []

        async def reply(ev):
            replies.append(ev)

        async def controls():
            await mgr.control(ss, {"type": "act", "action": {"mouse": [0.0, 0.2]}, "seq": 1}, reply)
            await mgr.control(ss, {"type": "act", "action": {"keys": ["slide"]}, "seq": 2}, reply)
        asyncio.run(controls())
        assert replies[0]["type"] == "error" and "takes no mouse input" in replies[0]["message"], replies
        assert replies[1] == {"type": "ack", "seq": 2} and ss.action == {"keys": ["slide"]}
        mgr.delete(ss)
    finally:
        mgr.close()


def test_discrete_model_still_refuses_dicts():
    from inferix.app.serve import Manager, ServeConfig, ServeError
    mgr = Manager(ServeConfig(model="toyworld", device="cpu", max_sessions=1))
    try:
        info = mgr.model_info()
        assert info["takes_image"] is False and info["actions"] == info["controls"] == \
            {"type": "discrete", "values": ["none", "up", "down", "left", "right"]}
        with pytest.raises(ServeError) as e:
            mgr.check_action({"keys": "w"})
        assert e.value.status == 400 and "not a dict of inputs" in e.value.message
        assert mgr.check_action("left") == "left"
    finally:
        mgr.close()


# ---- the page at / -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.browser
def test_page_image_keys_and_mouse(browser, srv):
    ctx = browser.new_context(viewport={"width": 1100, "height": 800})
    ctx.set_default_timeout(15000)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        pg.goto(srv.url + "/")
        pg.wait_for_function("document.getElementById('model').textContent.includes('fps')", timeout=15000)
        assert pg.is_visible("#image") and not pg.is_visible("#prompt")
        keys = pg.eval_on_selector_all("#actions button", "bs => bs.map(b => b.id)")
        assert keys == ["key-forward", "key-back", "key-left", "key-right"], keys
        pg.click("#start")  # no image yet: refused on the page, nothing opened
        wait_until(lambda: "start image" in pg.text_content("#error"), 5, "the missing-image error")
        assert pg.evaluate("window.inferix.session") is None
        buf = io.BytesIO()
        Image.fromarray(start_image(80, 96)).save(buf, "PNG")  # not the model's size: the page fits it
        pg.set_input_files("#image", files=[{"name": "start.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
        pg.wait_for_selector("#image-preview", state="visible")
        pg.click("#start")
        wait_until(lambda: pg.evaluate("window.inferix.session"), 15, "a session")
        (s,) = pg.evaluate("window.inferix.known")
        status = lambda: srv.get(f"/v1/sessions/{s['id']}", token=s["token"])  # noqa: E731
        wait_until(lambda: status()["frames"] > 0, 30, "frames of the session")
        assert pg.text_content("#error") == ""

        # W held: the session holds forward
        pg.click("h1")
        pg.keyboard.down("w")
        wait_until(lambda: status()["action"]["keys"] == ["forward"], 10, "forward held")
        assert "current" not in (pg.get_attribute("#key-forward", "class") or "") and \
            "held" in pg.get_attribute("#key-forward", "class")

        # a drag on the video to the right (and up) turns the camera right (and looks up), W still held
        box = pg.locator("#video").bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        pg.mouse.move(x, y)
        pg.mouse.down()

        def dragged():
            nonlocal x, y
            x, y = x + 6, y - 2
            pg.mouse.move(x, y)
            a = status()["action"]
            return a if a["keys"] == ["forward"] and a["mouse"][1] > 0 and a["mouse"][0] > 0 else None
        a = wait_until(dragged, 10, "a camera delta from the drag")
        assert 0 < a["mouse"][1] <= 0.5, a
        pg.mouse.up()
        # the mouse rests: a zero camera delta follows; W is released: no keys
        wait_until(lambda: status()["action"]["mouse"] == [0.0, 0.0], 5, "the camera to hold still")
        pg.keyboard.up("w")
        wait_until(lambda: status()["action"] == {"keys": [], "mouse": [0.0, 0.0]}, 5, "no input")

        # a click on the video takes the pointer (pointer lock): movement to the left turns the camera left
        pg.mouse.click(x, y)
        wait_until(lambda: pg.evaluate("window.inferix.pointerLocked"), 5, "pointer lock on the video")

        def moved():
            nonlocal x
            x -= 8
            pg.mouse.move(x, y)
            a = status()["action"]
            return a if a["mouse"][1] < 0 and a["mouse"][0] == 0 else None
        wait_until(moved, 10, "a camera delta under pointer lock")
        pg.evaluate("document.exitPointerLock()")  # what Esc does (a key sent through CDP does not reach it)
        wait_until(lambda: not pg.evaluate("window.inferix.pointerLocked"), 5, "the pointer to be released")
        wait_until(lambda: status()["action"]["mouse"] == [0.0, 0.0], 5, "the camera to hold still again")
        assert pg.text_content("#error") == "", pg.text_content("#error")
        pg.goto("about:blank")  # pagehide: the page deletes its session
        wait_until(lambda: srv.request("GET", f"/v1/sessions/{s['id']}", token=s["token"])[1].get("state")
              in ("cancelled", None), 15, "the session to be closed after the page was left")
        assert not errors, errors
    finally:
        ctx.close()
    h = pages_free(srv)
    assert h["kv_pages_used"] == 0, h
