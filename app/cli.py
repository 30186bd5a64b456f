"""``inferix demo``: registered through the ``inferix.commands`` entry-point group, so the engine's CLI never
imports the app. Gradio is imported only when the command runs."""
from __future__ import annotations

import argparse
import signal
import sys

__all__ = ["register", "add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="preset (toyworld, tiny, ...) or checkpoint path; default: the "
                   "embedded toy world, else the tiny preset")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--height", type=int, default=None, help="frame height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="frame width (default: the model's)")
    p.add_argument("--max-pixels", type=int, default=832 * 480, help="largest width*height the demo accepts")
    p.add_argument("--max-frames", type=int, default=1200, help="pixel frames per session (0: until stopped)")
    p.add_argument("--max-sessions", type=int, default=2, help="live streams the KV pool holds at once; "
                   "further tabs wait")
    p.add_argument("--kv-pages", type=int, default=None, help="KV pool size in pages (overrides --max-sessions; "
                   "a page holds the frame in every cache lane the model runs)")
    p.add_argument("--window", type=int, default=-1, help="latent frames attended (default: the model's, else 12; "
                   "0: no window)")
    p.add_argument("--sink", type=int, default=None, help="first latent frames kept for good")
    p.add_argument("--snapshots", type=int, default=3, help="rewind points kept per tab (each forks the session)")
    p.add_argument("--snapshot-every", type=int, default=3, help="blocks between rewind points")
    p.add_argument("--record-mib", type=int, default=512, help="memory per tab for the recording that playback "
                   "and the mp4 download use; older frames drop first")
    p.add_argument("--record-mib-total", type=float, default=2048, help="memory for the recordings of all tabs "
                   "together (MiB, default 2048); past it the oldest recorded frames of any tab drop first")
    p.add_argument("--idle-timeout", type=float, default=300, help="seconds (default 300) a stream may stay paused "
                   "or idle (finished, stopped) before it ends and its KV pages, rewind points and recording are "
                   "freed; a tab that sends no request for this long (a closed page, an API client) is closed too; "
                   "0: never")
    p.add_argument("--max-queue", type=int, default=8, help="tabs that may wait for a stream while the KV pool is "
                   "full (default 8); Start beyond that is refused with a message (0: no waiting)")
    p.add_argument("--max-prompt-chars", type=int, default=2000, help="longest prompt accepted, in characters "
                   "(default 2000), at Start and when switching it")
    p.add_argument("--max-upload-kib", type=int, default=1024, help="largest body the upload route accepts, in KiB "
                   "(default 1024; the page uploads only the start image of an image-conditioned model)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    from inferix.cli import add_model_option_arg
    add_model_option_arg(p)
    p.add_argument("--mirrors", default="", help="deprecated: --model-option mirrors=... (the toy world's mirror "
                   "views, comma-separated: h, v, hv, d, a)")


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="interactive streaming demo in the browser (Gradio)",
                              description="Serve the live streaming demo: one stream per browser tab, all tabs "
                                          "sharing one engine.")
    add_arguments(p)
    p.set_defaults(func=run)


def run(a) -> int:
    from inferix.models.mirrors import parse_mirrors
    from inferix.cli import model_options
    from .hub import DemoConfig, Hub
    try:
        options = model_options(a)
        cfg = DemoConfig(model=a.model, device=a.device, height=a.height, width=a.width, window=a.window,
                         sink=a.sink, max_sessions=a.max_sessions, kv_pages=a.kv_pages, max_frames=a.max_frames,
                         snapshots=a.snapshots, snapshot_every=a.snapshot_every, max_pixels=a.max_pixels,
                         record_mib=a.record_mib, threads=a.threads, mirrors=parse_mirrors(a.mirrors),
                         record_mib_total=a.record_mib_total, idle_timeout=a.idle_timeout, max_queue=a.max_queue,
                         max_prompt_chars=a.max_prompt_chars, max_upload_kib=a.max_upload_kib)
        cfg.model_options = options  # read by hub.build_engine
        hub = Hub(cfg)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .server import launch
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {a.host}: anyone who can reach this address can use the demo", file=sys.stderr)
    def on_term(*_):  # a service manager's stop ends the sessions the same way Ctrl-C does
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, on_term)
    try:
        launch(hub, a.host, a.port, block=True)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        hub.close()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m inferix.app", description="Inferix live streaming demo")
    add_arguments(p)
    return run(p.parse_args(argv))
