"""The Gradio page of the streaming demo: one stream per browser tab, all tabs sharing one engine.

    python -m inferix.app --model tiny --port 7860        # or: inferix demo ...

Frames are pushed to a ``gr.Image`` by a generator that plays each tab's recording at the model's frame rate
as blocks arrive (skipping ahead when it falls more than two blocks behind). Keys reach the engine through a
small script that clicks the action buttons. The engine itself lives in ``Hub`` (app/hub.py).

A keyboard-and-mouse model (Matrix-Game) gets a start image input (required to start) instead of the prompt, a
"held keys" checkbox group and, when it takes mouse input, a camera choice (steady, look up/down, turn left/right)
with a delta per frame. Its script ticks the key boxes while their letter keys are held and picks the camera
direction while an arrow key is held, so the keyboard goes the same way as a click.

The page is the only client: every event handler is private (not listed in the API info) and the direct-call
routes (``/gradio_api/call/...``, ``/gradio_api/run/...``, ``/gradio_api/api/...``) are refused, so nothing but the
page's own queue calls reaches a tab. The upload route takes at most ``DemoConfig.max_upload_kib`` (the page
uploads nothing, but the start image of an image-conditioned model).
"""
from __future__ import annotations

import asyncio
import html
import json
import os
import re
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402

from .hub import ENDED, PAUSED, WAITING, AdmissionError, DemoConfig, Hub  # noqa: E402

__all__ = ["build_demo", "launch", "DemoConfig", "Hub"]

# routes that run an event handler by name, outside the page's queue
DIRECT_CALLS = re.compile(r"(^|/)gradio_api/(call|run|api)(/|$)")


class NoDirectCalls:
    """ASGI middleware: answer 404 to the direct-call routes, so a handler runs only through the page's queue."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and DIRECT_CALLS.search(scope.get("path", "")):
            await PlainTextResponse("not found: this demo has no API", status_code=404)(scope, receive, send)
            return
        await self.app(scope, receive, send)

ARROWS = {"none": "■ none", "up": "↑ up", "down": "↓ down", "left": "← left", "right": "→ right"}

# Keys steer by clicking the (visible) action buttons, so a key press goes the same way as a click.
KEYS_JS = """
<script>
(() => {
  if (window.__inferixKeys) return;
  window.__inferixKeys = true;
  const map = {arrowleft: "left", a: "left", arrowright: "right", d: "right", arrowup: "up", w: "up",
               arrowdown: "down", s: "down", x: "none", " ": "none"};
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const choice = t && t.tagName === "INPUT" && ["radio", "checkbox", "button"].includes(t.type);
    const typing = t && !choice && (["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName) || t.isContentEditable);
    if (typing) return;
    const name = map[(e.key || "").toLowerCase()];
    if (!name) return;
    if (t && t.tagName === "BUTTON" && e.key === " ") return;  // space on a focused button presses that button
    const btn = document.getElementById("act-" + name);
    if (!btn) return;
    e.preventDefault();
    if (!e.repeat) btn.click();
  });
})();
</script>
"""

# the camera choices of a keyboard-and-mouse model: label, and the direction of [pitch, yaw] (up looks up)
CAMERA = {"steady": ("■ steady", (0.0, 0.0)), "up": ("↑ look up", (1.0, 0.0)),
          "down": ("↓ look down", (-1.0, 0.0)), "left": ("← turn left", (0.0, -1.0)),
          "right": ("→ turn right", (0.0, 1.0))}
CAMERA_SPEED = 0.1  # the default camera delta per frame

# Keyboard-and-mouse models: a letter key held ticks its box in #held-keys (released: unticks it), an arrow key
# held picks its camera direction in #camera (all released: steady); clicks, so the keyboard goes the same way
# as the mouse. __LETTERS__ maps key letters to key names.
KM_KEYS_JS = """
<script>
(() => {
  if (window.__inferixKeys) return;
  window.__inferixKeys = true;
  const letters = __LETTERS__;
  const arrows = {arrowup: "up", arrowdown: "down", arrowleft: "left", arrowright: "right"};
  const arrowsHeld = [];
  function box(name) {  // Gradio names each checkbox by its value
    return document.querySelector(`#held-keys input[type=checkbox][name="${name}"]`);
  }
  function camera(dir) {
    const r = document.querySelector(`#camera input[type=radio][value="${dir}"]`);
    if (r && !r.checked) r.click();
  }
  function hold(name, down) {
    const b = box(name);
    if (b && b.checked !== down) b.click();
  }
  function typing(t) {
    const choice = t && t.tagName === "INPUT" && ["radio", "checkbox", "button", "range"].includes(t.type);
    return t && !choice && (["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName) || t.isContentEditable);
  }
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || typing(e.target)) return;
    const k = (e.key || "").toLowerCase();
    if (letters[k]) {
      e.preventDefault();
      if (!e.repeat) hold(letters[k], true);
    } else if (arrows[k]) {
      e.preventDefault();
      if (e.repeat) return;
      if (!arrowsHeld.includes(k)) arrowsHeld.push(k);
      camera(arrows[k]);
    }
  });
  document.addEventListener("keyup", (e) => {
    const k = (e.key || "").toLowerCase();
    if (letters[k]) {
      hold(letters[k], false);
    } else if (arrows[k]) {
      const i = arrowsHeld.indexOf(k);
      if (i >= 0) arrowsHeld.splice(i, 1);
      camera(arrowsHeld.length ? arrows[arrowsHeld[arrowsHeld.length - 1]] : "steady");
    }
  });
  window.addEventListener("blur", () => {  // keys released while the page had no focus never come up
    for (const name of Object.values(letters)) hold(name, false);
    if (arrowsHeld.length) { arrowsHeld.length = 0; camera("steady"); }
  });
})();
</script>
"""


def km_keys_js(hub: Hub) -> str:
    """The key script of a keyboard-and-mouse model, with its key letters."""
    letters = {k["letter"]: k["name"] for k in hub.keys if k.get("letter")}
    return KM_KEYS_JS.replace("__LETTERS__", json.dumps(letters))


CSS = """
#stream img { image-rendering: pixelated; object-fit: contain; }
#stats { font-family: ui-monospace, monospace; font-size: 0.9em; }
#stats .sep { opacity: 0.4; padding: 0 0.4em; }
"""


def _status_text(st: dict) -> str:
    s = st["status"]
    if s == WAITING:
        pos = st["waiting_position"]
        where = f" (you are #{pos + 1} in line)" if pos is not None else ""
        return f"busy, {st['waiting']} waiting{where}"
    return {"idle": "idle: press Start", "cancelled": "stopped", "finished": "finished (frame limit reached)"
            }.get(s, s)


def _fmt(v, spec: str, unit: str = "") -> str:
    return "–" if v is None else format(v, spec) + unit


def stats_html(st: dict) -> str:
    limit = f" / {st['max_frames']}" if st["max_frames"] else ""
    action = st["action"] + ("" if st["actions_reach_model"] else " (this model takes no actions)")
    items = [
        ("status", "status", _status_text(st)),
        ("session", "stream", "–" if st["session_id"] is None else f"#{st['session_id']}"),
        ("frames", "frames", f"{st['frames']}{limit}"),
        ("fps", "pixel FPS incl. decode",
         f"{_fmt(st['pixel_fps'], '.1f')} (all tabs {_fmt(st['engine_pixel_fps'], '.1f')})"),
        ("latency", "block latency p50", _fmt(st["block_latency_p50_s"], ".2f", " s")),
        ("kv", "KV pages", f"{st['kv_pages_in_use']}/{st['kv_pages_total']}"),
        ("action", "action", action),
        ("rewind", "rewind points", str(len(st["snapshots"]))),
    ]
    parts = [f'{label}: <b data-stat="{key}">{html.escape(val)}</b>' for key, label, val in items]
    line = '<span class="sep">·</span>'.join(parts)
    prompt = f'prompt: <i data-stat="prompt">{html.escape(st["prompt"])}</i>' if st["prompt"] else ""
    msg = f'<div data-stat="message" style="color:#c33">{html.escape(st["message"])}</div>' if st["message"] else ""
    return f'<div data-status="{html.escape(st["status"])}">{line}</div><div>{prompt}</div>{msg}'


def build_demo(hub: Hub) -> gr.Blocks:
    eng = hub.engine

    def key_of(request: gr.Request) -> str:
        if request is None or not request.session_hash:
            raise gr.Error("no browser session")
        return request.session_hash

    def pause_label(status: str) -> str:
        return "Resume" if status == PAUSED else "Pause"

    km = hub.keyboard_mouse
    with gr.Blocks(title="Inferix live demo", delete_cache=(120, 300)) as demo:
        if km:
            letters = "/".join(k["letter"].upper() for k in hub.keys if k.get("letter")) or "the key boxes"
            acts = f"Choose a start image and press Start. Hold {letters} to move" + \
                ("; hold the arrow keys (or pick a camera direction) to turn the camera" if hub.mouse else "")
            gr.Markdown(f"### Inferix live world model demo\nModel **{html.escape(eng.bundle.name)}**, "
                        f"{eng.width}x{eng.height} at {eng.fps} fps. {acts}.")
        else:
            acts = "WASD / arrow keys steer, X or space holds still" if hub.model_actions else \
                "WASD / arrow keys are recorded (this model takes no actions)"
            gr.Markdown(f"### Inferix live world model demo\nModel **{html.escape(eng.bundle.name)}**, "
                        f"{eng.width}x{eng.height} at {eng.fps} fps. Press Enter in the prompt to switch it at the "
                        f"next block. {acts}.")
        with gr.Row():
            with gr.Column(scale=3):
                stream = gr.Image(label="live stream", elem_id="stream", format="png", interactive=False,
                                  height=420, buttons=[])
                stats = gr.HTML(elem_id="stats", value="status: idle")
            with gr.Column(scale=2):
                # an image-conditioned model takes no prompt: its start image takes the prompt's place
                prompt = gr.Textbox(label="Prompt (Enter switches it while running)",
                                    value="" if hub.takes_image else hub.default_prompt, elem_id="prompt", lines=1,
                                    max_lines=1, visible=not hub.takes_image)
                start_image = None
                if hub.takes_image:
                    start_image = gr.Image(label=f"Start image (required; cropped and scaled to {eng.width}x"
                                           f"{eng.height})", type="numpy", image_mode="RGB",
                                           sources=["upload", "clipboard"], elem_id="start-image", height=180)
                seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="start", min_width=60)
                    pause = gr.Button("Pause", elem_id="pause", min_width=60)
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", min_width=60)
                held = camera = speed = None
                act_buttons = {}
                if km:
                    held = gr.CheckboxGroup(
                        choices=[(f"{k['letter'].upper()} {k['name']}" if k.get("letter") else k["name"], k["name"])
                                 for k in hub.keys],
                        value=[], label="Held keys (hold the letter keys, or tick them)", elem_id="held-keys")
                    if hub.mouse:
                        camera = gr.Radio(choices=[(label, name) for name, (label, _) in CAMERA.items()],
                                          value="steady", label="Camera (arrow keys pick it while held)",
                                          elem_id="camera")
                        speed = gr.Slider(0.01, 0.5, value=CAMERA_SPEED, step=0.01, label="Camera delta per frame",
                                          elem_id="camera-speed")
                else:
                    with gr.Row():
                        act_buttons = {a: gr.Button(ARROWS.get(a, a), elem_id=f"act-{a}", size="sm", min_width=40)
                                       for a in hub.actions}
                snaps = gr.Radio(label="Rewind points (forks of the stream, newest last)", choices=[],
                                 elem_id="snapshots")
                with gr.Row():
                    rewind = gr.Button("Rewind & branch", elem_id="rewind", min_width=60)
                    save = gr.Button("Download mp4", elem_id="save", min_width=60)
                video_file = gr.File(label="Recorded video", elem_id="video-file", interactive=False, visible=False)

        # ---- handlers (each resolves its tab from the browser session) ----------------------------------
        def on_start(text, seed_v, request: gr.Request):
            key = key_of(request)
            try:
                hub.start(key, text, seed_v if seed_v is not None else 0)
            except (AdmissionError, ValueError, TypeError) as e:
                raise gr.Error(str(e), print_exception=False)
            return gr.update(value="Pause"), stats_html(hub.stats(key)), gr.update(choices=[], value=None)

        def on_start_image(text, seed_v, image, request: gr.Request):
            key = key_of(request)
            if image is None:
                raise gr.Error("choose a start image first: this model starts from an image", print_exception=False)
            try:
                hub.start(key, text, seed_v if seed_v is not None else 0, image=image)
            except (AdmissionError, ValueError, TypeError) as e:
                raise gr.Error(str(e), print_exception=False)
            return gr.update(value="Pause"), stats_html(hub.stats(key)), gr.update(choices=[], value=None)

        def on_keys(names, request: gr.Request):
            key = key_of(request)
            try:
                hub.steer(key, keys=list(names or []))
            except ValueError as e:
                raise gr.Error(str(e), print_exception=False)
            return stats_html(hub.stats(key))

        def on_camera(direction, delta, request: gr.Request):
            key = key_of(request)
            pitch, yaw = CAMERA.get(direction or "steady", CAMERA["steady"])[1]
            d = float(delta if delta is not None else CAMERA_SPEED)
            try:
                hub.steer(key, mouse=[pitch * d, yaw * d])
            except ValueError as e:
                raise gr.Error(str(e), print_exception=False)
            return stats_html(hub.stats(key))

        async def on_stream(request: gr.Request):
            """Play the tab's stream until it ends; one player per tab (a newer one retires this one)."""
            tab = hub.tabs.get(key_of(request))
            if tab is None:  # the tab closed before its player started
                return
            tab.stream_token += 1
            token = tab.stream_token
            period = 1.0 / max(1, hub.fps)
            max_backlog = 2 * hub.block_pixels
            pos = epoch = None
            last_meta = None
            last_yield = 0.0
            next_t = time.monotonic()
            while not (hub.closed or tab.closed or tab.stream_token != token):
                st = hub.stats(tab)
                if st["status"] in ("cancelled", "failed"):
                    frame, queued = None, 0
                else:
                    frame, pos, epoch, queued = tab.next_frame(pos, epoch, max_backlog)
                choices = st["snapshots"]
                meta = (stats_html(st), tuple(choices), st["status"])
                now = time.monotonic()
                ended = st["status"] in ENDED or st["status"] == "idle"
                if frame is not None or meta != last_meta or now - last_yield > 1.0:
                    snap_upd = gr.update(choices=choices) if last_meta is None or meta[1] != last_meta[1] \
                        else gr.update()
                    pause_upd = gr.update(value=pause_label(st["status"])) if last_meta is None or \
                        meta[2] != last_meta[2] else gr.update()
                    yield (frame if frame is not None else gr.update()), meta[0], snap_upd, pause_upd
                    last_meta, last_yield = meta, now
                if frame is None and ended or st["status"] in ("cancelled", "failed"):
                    return  # Stop freezes the picture at once; a finished stream plays to its last frame
                # play at the model's frame rate; twice as fast while more than a block is queued
                next_t += period if queued <= hub.block_pixels else period / 2
                if frame is None:
                    next_t = now + 0.03
                await asyncio.sleep(max(0.0, next_t - time.monotonic()))
                if next_t < time.monotonic() - 1.0:  # fell far behind the clock: do not burst to catch up
                    next_t = time.monotonic()

        def on_pause(request: gr.Request):
            status = hub.toggle_pause(key_of(request))
            return gr.update(value=pause_label(status))

        def on_stop(request: gr.Request):
            key = key_of(request)
            hub.stop(key)
            return gr.update(value="Pause"), stats_html(hub.stats(key)), gr.update(choices=[], value=None)

        def on_prompt(text, request: gr.Request):
            key = key_of(request)
            try:
                hub.set_prompt(key, text)
            except ValueError as e:
                raise gr.Error(str(e), print_exception=False)
            return stats_html(hub.stats(key))

        def make_act(name):
            def on_act(request: gr.Request):
                key = key_of(request)
                hub.act(key, name)
                return stats_html(hub.stats(key))
            return on_act

        def on_rewind(snap_id, request: gr.Request):
            key = key_of(request)
            try:
                chosen = hub.rewind(key, snap_id)
            except ValueError as e:
                raise gr.Error(str(e))
            st = hub.stats(key)
            return gr.update(value=chosen.prompt), gr.update(value="Pause"), stats_html(st), \
                gr.update(choices=st["snapshots"], value=None)

        def on_save(request: gr.Request):
            path = hub.write_video(key_of(request))
            if path is None:
                raise gr.Error("nothing recorded yet: press Start first")
            return gr.update(value=str(path), visible=True)

        def on_unload(request: gr.Request):
            if request is not None and request.session_hash:
                hub.close_tab(request.session_hash)

        quiet = dict(show_progress="hidden", api_visibility="private")
        play = dict(fn=on_stream, inputs=None, outputs=[stream, stats, snaps, pause], concurrency_limit=None,
                    **quiet)
        if start_image is not None:
            start.click(on_start_image, [prompt, seed, start_image], [pause, stats, snaps], trigger_mode="multiple",
                        **quiet).success(**play)
        else:
            start.click(on_start, [prompt, seed], [pause, stats, snaps], trigger_mode="multiple", **quiet) \
                .success(**play)
        rewind.click(on_rewind, [snaps], [prompt, pause, stats, snaps], trigger_mode="multiple", **quiet) \
            .success(**play)
        pause.click(on_pause, None, [pause], **quiet)
        stop.click(on_stop, None, [pause, stats, snaps], **quiet)
        prompt.submit(on_prompt, [prompt], [stats], **quiet)
        for name, btn in act_buttons.items():
            btn.click(make_act(name), None, [stats], trigger_mode="multiple", **quiet)
        # the held input is a state, not a sequence of presses: only the newest change of a control matters
        if held is not None:
            held.input(on_keys, [held], [stats], trigger_mode="always_last", **quiet)
        if camera is not None:
            camera.input(on_camera, [camera, speed], [stats], trigger_mode="always_last", **quiet)
            speed.release(on_camera, [camera, speed], [stats], trigger_mode="always_last", **quiet)
        save.click(on_save, None, [video_file], **quiet)
        demo.unload(on_unload)
    return demo


def launch(hub: Hub, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True, quiet: bool = False):
    """Serve the demo; with block=False it returns the running gr.Blocks (call .close() and hub.close())."""
    demo = build_demo(hub)
    demo.queue(default_concurrency_limit=4, api_open=False)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=quiet, show_error=True,
                head=km_keys_js(hub) if hub.keyboard_mouse else KEYS_JS, css=CSS, footer_links=[], ssr_mode=False,
                max_threads=64, max_file_size=hub.config.max_upload_kib * 1024,
                app_kwargs={"middleware": [Middleware(NoDirectCalls)]})
    return demo
