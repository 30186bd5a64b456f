"""Time to first frame with and without shared start prefixes: N users start the same toy-world scene one after
another (each opens once the previous one has its first frame, then all keep streaming together).

Time to first frame is measured from ``open_session`` (simulator start frames and their encoding included) to the
first decoded frame block in the session's hands, with the engine stepping every open session meanwhile; it
includes the passes of the other users' streams that share those steps. Prints JSON.

Each mode runs --repeats times, alternating, after one untimed run of each; per user the median is reported.

    .venv/bin/python benchmarks/prefix_bench.py [--users 6] [--frames 24] [--repeats 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from inferix.engine import Engine
from inferix.plan import PREFILL

PROMPT = "a red cube in a snowy field"


def run(share: bool, users: int, frames: int, device: str) -> dict:
    eng = Engine.from_pretrained("toyworld", device=device, max_sessions=users, share_prefixes=share)
    prefill = [0]
    eng.hooks.append(lambda plan, outs: prefill.__setitem__(0, prefill[0] + sum(
        len(g.rows) for g in plan.groups if g.kind == PREFILL)))
    warm = eng.open_session("warm-up", num_frames=4, seed=99, init_frames=None)  # first-call costs out
    for _ in warm:
        pass
    prefill[0] = 0
    ttff, outs, sessions = [], [], []
    for i in range(users):
        t0 = time.perf_counter()
        s = eng.open_session(PROMPT, num_frames=frames, seed=1)  # the same scene: the same start frames
        sessions.append(s)
        got = []
        while not got:
            eng.step()
            got = s.poll()
        ttff.append(time.perf_counter() - t0)
        outs.append(got)
    eng.run_until_idle()
    for s, got in zip(sessions, outs):
        got.extend(s.poll())
    st = eng.stats()
    return {"share_prefixes": share, "ttff_s": [round(t, 4) for t in ttff],
            "ttff_median_s": round(statistics.median(ttff), 4),
            "ttff_median_later_users_s": round(statistics.median(ttff[1:]), 4) if users > 1 else None,
            "prefill_rows": prefill[0], "prefixes": st.get("prefixes"),
            "frames": [np.concatenate(o) for o in outs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=6)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    modes = ("not_shared", "shared")
    for k in modes:  # untimed: process-wide first-call costs (allocator, kernels, caches)
        run(k == "shared", 2, 8, a.device)
    runs = {k: [] for k in modes}
    for _ in range(a.repeats):
        for k in modes:
            runs[k].append(run(k == "shared", a.users, a.frames, a.device))
    res = {}
    for k in modes:
        r = runs[k][-1]
        ttff = [statistics.median(x["ttff_s"][i] for x in runs[k]) for i in range(a.users)]
        r["ttff_s"] = [round(t, 4) for t in ttff]
        r["ttff_median_s"] = round(statistics.median(ttff), 4)
        r["ttff_median_later_users_s"] = round(statistics.median(ttff[1:]), 4) if a.users > 1 else None
        res[k] = r
    same = all(np.array_equal(x, y) for x, y in zip(res["shared"].pop("frames"), res["not_shared"].pop("frames")))
    print(json.dumps({"model": "toyworld", "device": a.device, "users": a.users, "frames_per_user": a.frames,
                      "note": "ttff: open_session (start frames simulated and encoded) to the first decoded block, "
                              "the engine stepping every open stream meanwhile; users start one after another; "
                              f"per user the median of {a.repeats} runs",
                      "frames_equal_note": "every user's frames with sharing equal those without (last run)",
                      "frames_equal": same, **res}, indent=2))


if __name__ == "__main__":
    main()
