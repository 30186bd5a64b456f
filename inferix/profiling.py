"""Engine profiling: time to first frame, per-block latency, pixel FPS including decode, time split, memory."""
from __future__ import annotations

import json
import resource
import statistics
import time
from collections import deque

import torch

__all__ = ["Profiler", "compiled_graphs"]


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def _percentile(xs, q):
    if not xs:
        return None
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


class Profiler:
    def __init__(self, engine):
        self.engine = engine
        self.opened: dict[int, float] = {}
        self.first_frame: dict[int, float] = {}
        self.last_block: dict[int, float] = {}
        # seconds between consecutive blocks of a session (first: from open); recent ones only, so a server
        # that runs for days keeps a bounded profile
        self.block_latency: deque = deque(maxlen=4096)
        self.ttff: deque = deque(maxlen=1024)
        self.frames = 0
        self.t0: float | None = None
        self.t_last: float | None = None
        self.max_pages = 0
        self.steps = 0
        self.step_time = 0.0
        self.graphs0 = compiled_graphs()

    def session_opened(self, sid: int) -> None:
        now = time.perf_counter()
        self.opened[sid] = now
        self.last_block[sid] = now
        if self.t0 is None:
            self.t0 = now

    def block_delivered(self, sid: int, nframes: int) -> None:
        now = time.perf_counter()
        if sid not in self.first_frame and sid in self.opened:
            self.ttff.append(now - self.opened[sid])
        self.first_frame.setdefault(sid, now)
        self.block_latency.append(now - self.last_block.get(sid, now))
        self.last_block[sid] = now
        self.frames += nframes
        self.t_last = now

    def step_done(self, plan, outs, seconds: float) -> None:
        self.steps += 1
        self.step_time += seconds
        self.max_pages = max(self.max_pages, self.engine.kv.pages_in_use)

    def forget(self, sid: int) -> None:
        for d in (self.opened, self.first_frame, self.last_block):
            d.pop(sid, None)

    def summary(self) -> dict:
        e = self.engine
        ttff = list(self.ttff)
        wall = (self.t_last - self.t0) if (self.t0 is not None and self.t_last is not None) else 0.0
        t = e.runner.timing
        worker = e.runner.decode_worker
        graphs = compiled_graphs() - self.graphs0
        if e.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(e.device) / 2 ** 20
            peak_what = "peak CUDA memory allocated (MiB)"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            peak_what = "peak process resident memory (MiB)"
        return {
            "device": str(e.device),
            "model": e.bundle.name,
            "resolution": f"{e.width}x{e.height}",
            "attention_backend": e.backend.name,
            "time_to_first_frame_s": statistics.median(ttff) if ttff else None,
            "time_to_first_frame_note": "from open_session to the first decoded frame block (median over sessions)",
            "block_latency_p50_s": _percentile(self.block_latency, 50),
            "block_latency_p95_s": _percentile(self.block_latency, 95),
            "pixel_frames": self.frames,
            "wall_s": wall,
            "pixel_fps_including_decode": (self.frames / wall) if wall > 0 else None,
            "time_split_s": {"denoise": t["denoise"], "commit": t["commit"], "decode": t["decode"],
                             "decode_overlapped": worker.seconds if worker is not None else 0.0,
                             "model_forward": t["forward"], "engine_steps": self.step_time,
                             "finish_block": t["finish_block"]},
            "time_split_note": "model_forward includes the extra rows a model runs beside each stream, in the "
                               "stream's own passes; denoise includes finish_block, what the model does to each "
                               "finished block before its commit (models/adapter.py); "
                               "decode_overlapped is decode on the worker thread beside the engine steps "
                               "(--overlap-decode), not part of engine_steps",
            "overlap_decode": worker is not None,
            "compile": e.compile,
            "fp8": e.fp8,
            "cuda_graphs": None if e.runner.graphs is None else {"captured": e.runner.graphs.captures,
                                                                  "replays": e.runner.graphs.replays},
            "compiled_graphs": graphs,
            "compiled_graphs_note": "graphs torch.compile built while this profile ran: the warm-up's, then one "
                                    "per new batch or block size; none in a steady stream",
            "engine_overhead_fraction": (1 - (t["forward"] + t["decode"] + t["finish_block"]) / self.step_time)
            if self.step_time else None,
            "model_options": e.adapter.settings(),
            "forward_calls": e.runner.forward_calls,
            "kv_pages_in_use": e.kv.pages_in_use,
            "kv_pages_max_in_use": self.max_pages,
            "kv_pages_total": e.kv.num_pages,
            "kv_pool_mib": e.pool.nbytes() / 2 ** 20,
            "kv_lanes": e.kv_lanes,
            "kv_pool_note": "a page is one latent frame of a session in every lane: the stream's K/V and each "
                            "extra cache lane its model asks for, so kv_pool_mib includes those caches",
            "peak_memory_mib": peak,
            "peak_memory_note": peak_what,
        }

    def write(self, path) -> dict:
        s = self.summary()
        with open(path, "w") as f:
            json.dump(s, f, indent=2)
        return s
