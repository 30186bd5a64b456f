"""Sessions served per device pool with the host-memory tier; prints JSON.

    python benchmarks/host_tier_bench.py

The tiny preset with a window of 6 latent frames: a device pool for 2 sessions (12 pages) and host tiers of 0,
12, 24 and 48 pages. Users arrive one after another; each streams 2 blocks, then pauses at a block boundary (a
player who stepped away). The figure is how many sessions hold state at once (running, paused on the device or
paused on the host) before the next user has to wait, and the time the moves took (device -> host when room is
made, host -> device when a paused user resumes: all users resume once at the end, one after another).
"""
from __future__ import annotations

import json
import time

import torch


def serve(host_pages: int, users: int = 12) -> dict:
    from inferix.engine import Engine
    from inferix.models.bundle import load_model
    eng = Engine(load_model("tiny"), window=6, max_sessions=2, host_pages=host_pages)
    held, sessions = 0, []
    t0 = time.perf_counter()
    for i in range(users):
        s = eng.open_session(f"user {i}", num_frames=None, seed=i)
        sessions.append(s)
        if s.status == "waiting":
            s.cancel()
            break
        blocks = 0
        while blocks < 2:
            eng.step()
            blocks += len(s.poll())
        while not s.at_block_boundary:
            eng.step()
            s.poll()
        s.pause()
        held += 1
    open_s = time.perf_counter() - t0
    back, t1 = 0, time.perf_counter()
    for s in sessions:  # each comes back (and streams one block) in turn, pushing others out as needed
        if s.status != "paused":
            continue
        s.resume()
        for _ in range(200):
            eng.step()
            if s.poll():
                back += 1
                break
        while not s.at_block_boundary:
            eng.step()
            s.poll()
        s.pause()
    resume_s = time.perf_counter() - t1
    st = eng.stats()
    for s in sessions:
        s.cancel()
    return {"host_pages": host_pages, "device_pages": eng.kv.num_pages, "sessions_held_at_once": held,
            "resumed_and_streamed_again": back, "host_stats": st.get("host_pages"),
            "open_phase_s": open_s, "resume_phase_s": resume_s,
            "pages_after_cancel": {"device_reserved": eng.kv.reserved, "device_in_use": eng.kv.pages_in_use}}


def main() -> int:
    torch.set_num_threads(1)
    res = {"benchmark": "host-memory tier", "model": "tiny preset (window 6, VAE decode included)",
           "note": __doc__.split("The tiny preset")[1].strip(), "runs": [serve(h) for h in (0, 12, 24, 48)]}
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
