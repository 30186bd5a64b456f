"""``inferix bench serve``: N concurrent clients against ``inferix serve``, measured on the client side.

Each client (a thread with its own :class:`inferix.client.Client`) opens a live session, reads ``--blocks`` blocks
of decoded frames and, with ``--actions``, sends an action at every block it receives, timing each one to the
arrival of the first frame of the block the server says it applied in. Without ``--url`` a server is started
(``inferix serve --model M`` on a free 127.0.0.1 port, ``--max-sessions`` = the number of clients) and stopped at
the end. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

__all__ = ["main", "add_arguments", "start_server", "stop_server", "summarize_metrics"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=4, help="concurrent clients, one live session each (default 4)")
    p.add_argument("--url", default=None, help="a running server (default: start one with --model)")
    p.add_argument("--model", default="toyworld", help="model of the server started without --url (default "
                   "toyworld)")
    p.add_argument("--api-key", default=None, help="the server's API key (default: INFERIX_API_KEY)")
    p.add_argument("--blocks", type=int, default=12, help="blocks each client receives (default 12)")
    p.add_argument("--video", choices=["jpeg", "fmp4"], default="jpeg", help="video each session sends")
    p.add_argument("--actions", action="store_true", help="send an action at every received block and time it to "
                   "the block it applied in")
    p.add_argument("--prompt", default="a sunny meadow")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for the started server (repeatable, e.g. --server-arg=--max-ahead=2)")
    p.add_argument("--start-timeout", type=float, default=180, help="seconds to wait for the started server")
    p.add_argument("--timeout", type=float, default=120, help="seconds a client waits for one frame")


# -- the server -------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, args: list[str] = (), timeout: float = 180, api_key: str | None = None,
                 log=None) -> tuple[subprocess.Popen, str]:
    """``inferix serve --model MODEL`` on a free loopback port; returns (process, base URL) once
    ``/v1/health`` answers. Raises RuntimeError (after stopping it) when it exits or does not answer in time."""
    import httpx
    port = free_port()
    cmd = [sys.executable, "-m", "inferix", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), *args]
    env = dict(os.environ)
    if api_key:
        env["INFERIX_API_KEY"] = api_key
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log or subprocess.DEVNULL,
                            stderr=log or subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before answering: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/v1/health", headers=headers, timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"the server did not answer /v1/health in {timeout:g} s: {' '.join(cmd)}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen, timeout: float = 15) -> int | None:
    """SIGTERM (a clean shutdown), then SIGKILL after ``timeout`` seconds; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


# -- /metrics ---------------------------------------------------------------------------------------------------
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """A quantile from cumulative histogram buckets [(le, count)], interpolated inside the bucket it falls in."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1.0)
        prev_le, prev_c = le, c
    return prev_le


def summarize_metrics(text: str) -> dict:
    """The histograms of a Prometheus text (count, mean, p50 and p95 from the buckets) and its plain values."""
    hist: dict[str, dict] = {}
    plain: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        try:
            v = float(value)
        except ValueError:
            continue
        if name.endswith("_bucket"):
            le = re.search(r'le="([^"]+)"', labels)
            if le:
                hist.setdefault(name[:-7], {}).setdefault("buckets", []).append((float(le.group(1)), v))
        elif name.endswith("_sum") and name[:-4] in hist:
            hist[name[:-4]]["sum"] = v
        elif name.endswith("_count") and name[:-6] in hist:
            hist[name[:-6]]["count"] = v
        else:
            plain[name + labels] = v
    out = {}
    for name, h in hist.items():
        b = sorted(h.get("buckets", []))
        n = h.get("count", b[-1][1] if b else 0)
        out[name] = {"count": int(n), "mean_s": (h.get("sum", 0.0) / n) if n else None,
                     "p50_s": _quantile(b, 0.5), "p95_s": _quantile(b, 0.95)}
    return {"histograms": out, "values": plain}


# -- clients ----------------------------------------------------------------------------------------------------
def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_client(i: int, url: str, a, actions: list, start: threading.Barrier, out: list) -> None:
    from .client import Client
    r = {"client": i, "frames": 0, "blocks": 0, "controls": [], "error": None}
    out[i] = r
    try:
        with Client(url, api_key=a.api_key, timeout=a.timeout) as c:
            start.wait(a.timeout)
            t_post = time.perf_counter()
            s = c.open(None if a.image is not None else a.prompt, seed=i, video=a.video, image=a.image)
            r["state_at_open"] = s.state
            last_block, sent, pending, extra = None, 0, {}, 0
            first_frame_at = {}  # block index -> arrival of its first frame
            for ev, frame in s.frames(timeout=a.timeout, with_block=True):
                now = time.perf_counter()
                b = ev.get("block") if ev else None
                if b != last_block or r["frames"] == 0:
                    if r["blocks"] >= a.blocks:  # a new block after the last one wanted
                        extra += 1
                        if not pending or extra > 8:  # (a few more to see the last actions apply)
                            break
                    last_block = b
                    r["blocks"] += 1
                    first_frame_at[b] = now
                    for seq, (t_sent, sent_block) in list(pending.items()):
                        ab = s.applied_block(seq)
                        if ab is not None and ab in first_frame_at:
                            r["controls"].append({"seq": seq, "applied_block": ab, "sent_block": sent_block,
                                                  "latency_s": first_frame_at[ab] - t_sent})
                            del pending[seq]
                    if actions and r["blocks"] < a.blocks:
                        seq = s.act(actions[sent % len(actions)])
                        sent += 1
                        pending[seq] = (time.perf_counter(), b)
                if r["frames"] == 0:
                    r["ttff_s"] = now - t_post
                    r["first_frame_t"] = now
                    r["shape"] = list(frame.shape)
                r["frames"] += 1
                r["last_frame_t"] = now
            r["controls_unresolved"] = len(pending)
            s.close()
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        r["error"] = f"{type(e).__name__}: {e}"


def bench(a, url: str) -> dict:
    from .client import Client
    with Client(url, api_key=a.api_key, timeout=a.timeout) as c:
        model = c.model()
    controls = model.get("controls") or model.get("actions") or {}
    if controls.get("type") == "keyboard_mouse":  # held keys in turn, with a small camera turn when it has a mouse
        acts = [{"keys": k["letter"], **({"mouse": [0.0, 0.05]} if controls.get("mouse") else {})}
                for k in controls.get("keys", []) if k.get("letter")]
    else:
        acts = controls.get("values") or []
    actions = [x for x in acts if x not in ("none", "noop", None)] or list(acts)
    a.image = None
    if model.get("takes_image"):  # a start image of the server's size (random pixels: speed does not depend on them)
        import numpy as np
        h, w = model.get("height"), model.get("width")
        a.image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if a.actions and not actions:
        raise SystemExit(f"error: --actions: the model {model.get('name')!r} takes no actions")
    results: list = [None] * a.clients
    start = threading.Barrier(a.clients)
    threads = [threading.Thread(target=run_client, args=(i, url, a, actions if a.actions else [], start, results),
                                daemon=True) for i in range(a.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r and not r["error"] and r["frames"]]
    ttff = [r["ttff_s"] for r in ok]
    fps = [(r["frames"] - 1) / (r["last_frame_t"] - r["first_frame_t"]) for r in ok
           if r["frames"] > 1 and r["last_frame_t"] > r["first_frame_t"]]
    total = sum(r["frames"] for r in ok)
    span = (max(r["last_frame_t"] for r in ok) - t0) if ok else None
    lat = [x["latency_s"] for r in ok for x in r["controls"]]
    behind = [x["applied_block"] - x["sent_block"] for r in ok for x in r["controls"]
              if x["sent_block"] is not None]
    with Client(url, api_key=a.api_key, timeout=a.timeout) as c:
        try:
            server = summarize_metrics(c.metrics())
        except Exception as e:  # noqa: BLE001
            server = {"error": str(e)}
        health = c.health()
    return {
        "benchmark": "serve", "url": url, "model": model.get("name"), "video": a.video, "clients": a.clients,
        "blocks_per_client": a.blocks, "frame_shape": ok[0]["shape"] if ok else None,
        "fps_model": model.get("fps"), "block_pixel_frames": model.get("block_pixel_frames"),
        "errors": [r["error"] for r in results if r and r["error"]],
        "time_to_first_frame_s": {"p50": _percentile(ttff, 0.5), "p95": _percentile(ttff, 0.95),
                                  "n": len(ttff)},
        "delivered_fps_per_session": {"mean": statistics.fmean(fps) if fps else None,
                                      "min": min(fps) if fps else None},
        "aggregate_fps": total / span if span else None,
        "frames_total": total,
        "control_to_applied_s": {"p50": _percentile(lat, 0.5), "p95": _percentile(lat, 0.95), "n": len(lat),
                                 "unresolved": sum(r.get("controls_unresolved", 0) for r in ok),
                                 "blocks_after_sent_block": {"min": min(behind) if behind else None,
                                                             "max": max(behind) if behind else None}},
        "server_metrics": server.get("histograms", server),
        "kv_pages_used_after": health.get("kv_pages_used"),
        "includes": {
            "time_to_first_frame_s": "client side, from sending POST /v1/sessions to the first decoded frame: "
                                     "admission, prompt encoding, the first block's generation and decode on the "
                                     "server, video encoding, the WebSocket connect and transfer, client decoding",
            "delivered_fps_per_session": "decoded frames per second each client received, from its first frame "
                                         "to its last (steady state; N sessions share the engine)",
            "aggregate_fps": "all clients' decoded frames divided by the wall time from the start of the "
                             "clients (before their POSTs) to the last frame any of them received",
            "control_to_applied_s": "from sending an act message to the client's receipt of the first decoded "
                                    "frame of the block the server's applied event names (includes the blocks "
                                    "already made or in flight: up to --max-ahead + 1)",
            "blocks_after_sent_block": "applied block minus the block whose first frame had just arrived when "
                                       "the action was sent",
            "server_metrics": "the server's /metrics histograms (all sessions since it started), quantiles "
                              "interpolated from the buckets",
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="inferix bench serve",
                                description="N concurrent clients against inferix serve, timed on the client "
                                            "side; prints JSON (time to first frame, delivered frames/s, action "
                                            "latency).")
    add_arguments(p)
    a = p.parse_args(argv)
    if a.clients < 1 or a.blocks < 1:
        p.error("--clients and --blocks must be at least 1")
    a.api_key = a.api_key or os.environ.get("INFERIX_API_KEY") or None
    proc = None
    url = a.url
    try:
        if url is None:
            args = ["--max-sessions", str(a.clients), *a.server_arg]
            try:
                proc, url = start_server(a.model, args, timeout=a.start_timeout, api_key=a.api_key)
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        r = bench(a, url.rstrip("/"))
    finally:
        if proc is not None:
            stop_server(proc)
    if proc is not None:
        r["url"] = f"started: inferix serve --model {a.model}"
    print(json.dumps(r, indent=2))
    return 0 if not r["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
