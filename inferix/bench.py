"""Benchmarks that print JSON (not tests): ``inferix bench generate`` and ``inferix bench engine``.

generate: end-to-end generation with a preset (random weights: speed does not depend on them): pixel frames/s
including VAE decode, time to first frame, per-block latency, peak memory.
engine: scheduler/KV costs on a tiny model without decode: per-block latency near block 10 vs near block 1,000
with a rolling window, engine overhead (step wall time minus model forward time), and 4 sessions batched vs
the same 4 run one after another.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

__all__ = ["main"]


def bench_generate(a) -> dict:
    from .engine import Engine
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = a.preset or ("wan2.1-t2v-1.3b" if device == "cuda" else "tiny")
    from inferix.models.bundle import load_model
    from .sizing import pool_pages
    # The model's own window and sink unless --window is given (0: none); the pool holds what the session
    # reserves (its window, or every latent frame of the video), by the engine's own sizing rule.
    bundle = load_model(preset, device=device,
                        dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)
    window = bundle.window if a.window is None else (a.window or None)
    start = bundle.start_frames(a.prompt, 0)
    n_init = 0 if start is None else bundle.latent_frames(len(start))
    eng = Engine(bundle, device=device, attention=a.attention, height=a.height, width=a.width,
                 window=window, max_sessions=1,
                 kv_pages=max(pool_pages(bundle, window, 1, a.frames, n_init),
                              pool_pages(bundle, window, 1, bundle.pixel_frames(2 * bundle.sampling.block_frames))),
                 overlap_decode=a.overlap_decode, compile=a.compile)
    # warm-up, not counted: a two-block session (allocator, and the kernels of a block without and with cached
    # context, which Triton compiles separately)
    extra = {}
    if eng.adapter.takes_image:  # an image-conditioned world model: a start image and a held key + camera turn
        g = torch.Generator().manual_seed(0)
        img = (torch.rand(eng.height, eng.width, 3, generator=g) * 255).to(torch.uint8).numpy()
        controls = eng.adapter.controls()
        act = {"keys": controls["keys"][0]["letter"] or ""}
        if controls.get("mouse"):
            act["mouse"] = [0.0, 0.05]
        extra = {"init_image": img, "actions": [act] * a.frames}
    for _ in eng.generate("warm up", num_frames=eng.bundle.pixel_frames(2 * eng.block_frames),
                          **{k: (v[:eng.bundle.pixel_frames(2 * eng.block_frames)] if k == "actions" else v)
                             for k, v in extra.items()}):
        pass
    eng.profiler.__init__(eng)
    eng.runner.timing = {k: 0.0 for k in eng.runner.timing}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    n, first = 0, None
    for block in eng.generate(a.prompt, num_frames=a.frames, seed=0, **extra):
        if first is None:
            first = time.perf_counter() - t0
        n += len(block)
    wall = time.perf_counter() - t0
    s = eng.stats()
    s.update({"benchmark": "generate", "preset": preset, "frames": n, "steps_per_block": eng.bundle.sampling.num_steps,
              "block_latent_frames": eng.block_frames, "end_to_end_wall_s": wall,
              "pixel_fps_end_to_end": n / wall, "time_to_first_frame_from_request_s": first,
              "resolution": f"{eng.width}x{eng.height}",
              "note": "pixel frames/s include DiT denoise + commit passes and VAE decode (overlapped with the "
                      "passes when overlap_decode is on); the warm-up session, which pays torch.compile's graphs, "
                      "is not counted; time_to_first_frame_from_request_s runs from the request (session open, "
                      "start-image encode included) to the first decoded block"
                      + ("" if preset == "toyworld" else "; weights are random")})
    if device == "cuda":
        s["gpu"] = torch.cuda.get_device_name()
    return s


def _tiny_engine(window, kv_pages, device, sink=0):
    from inferix.models.bundle import ModelBundle
    from inferix.models.schedule import SamplingConfig
    from inferix.models.text_encoder import HashTextEncoder
    from inferix.models.wan_dit import CausalWanDiT, PRESETS
    from .engine import Engine
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    b = ModelBundle(name="tiny-latent", dit=CausalWanDiT(cfg).eval().to(device), sampling=SamplingConfig(),
                    text_encoder=HashTextEncoder(cfg.text_dim, cfg.text_len), height=64, width=64)
    return Engine(b, device=device, window=window, sink=sink, kv_pages=kv_pages)


def bench_engine(a) -> dict:
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = {"benchmark": "engine", "device": device, "threads": torch.get_num_threads(), "model": "tiny DiT (64x64 px -> 8x8 latent, 16 tokens/frame), "
           "latents only (no decode)"}
    # 1) block latency near block 10 vs near block N with a window of 12 frames (+3 sink)
    eng = _tiny_engine(window=12, kv_pages=12, device=device, sink=3)
    lat = {}
    t_block = [time.perf_counter()]

    def hook(plan, outs):
        if outs:
            t_block.append(time.perf_counter())
    eng.hooks.append(hook)
    sess = eng.open_session("bench", num_frames=3 * a.blocks, seed=0)
    for _ in sess:
        pass
    d = [t_block[i + 1] - t_block[i] for i in range(len(t_block) - 1)]
    lat["block_10_s"] = statistics.median(d[5:15])
    lat["block_last_s"] = statistics.median(d[-10:])
    lat["ratio_last_over_10"] = lat["block_last_s"] / lat["block_10_s"]
    lat["blocks"] = a.blocks
    lat["kv_pages_max_in_use"] = eng.profiler.max_pages
    out["block_latency"] = lat
    # 2) engine overhead: engine step wall time not spent in the model forward
    t = eng.runner.timing
    out["engine_overhead"] = {"steps_wall_s": eng.profiler.step_time, "model_forward_s": t["forward"],
                              "overhead_fraction": 1 - t["forward"] / eng.profiler.step_time,
                              "note": "scheduling, page-table edits, metadata, noise, solver math per step"}
    # 2b) the same on the embedded default model (the toy world: 64 tokens/frame, 1.8 M params), decode included
    from inferix.models.bundle import WEIGHTS_DIR
    if (WEIGHTS_DIR / "toyworld.json").exists():
        from .engine import Engine
        tw = Engine.from_pretrained("toyworld", device=device, max_sessions=1)
        for _ in tw.generate("a snowy field", num_frames=4 * a.toy_blocks, seed=0):
            pass
        tt = tw.runner.timing
        out["engine_overhead_toyworld"] = {
            "blocks": a.toy_blocks, "steps_wall_s": tw.profiler.step_time, "model_forward_s": tt["forward"],
            "decode_s": tt["decode"],
            "overhead_fraction": 1 - (tt["forward"] + tt["decode"]) / tw.profiler.step_time}
    # 3) 4 sessions batched vs one after another (same total work)
    frames = 3 * a.batch_blocks
    seq_eng = _tiny_engine(window=None, kv_pages=4 * frames, device=device)
    t0 = time.perf_counter()
    for i in range(4):
        for _ in seq_eng.generate(f"p{i}", num_frames=frames, seed=i):
            pass
    t_seq = time.perf_counter() - t0
    bat_eng = _tiny_engine(window=None, kv_pages=4 * frames, device=device)
    t0 = time.perf_counter()
    for i in range(4):
        bat_eng.open_session(f"p{i}", num_frames=frames, seed=i)
    bat_eng.run_until_idle()
    t_bat = time.perf_counter() - t0
    out["batching"] = {"sessions": 4, "blocks_each": a.batch_blocks, "sequential_s": t_seq, "batched_s": t_bat,
                       "speedup": t_seq / t_bat}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="inferix bench")
    p.add_argument("what", choices=["generate", "engine"])
    p.add_argument("--preset", default=None, help="generate: model preset (default: 1.3B on CUDA, tiny on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--attention", default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--frames", type=int, default=81, help="generate: pixel frames")
    p.add_argument("--prompt", default="a corgi running on a beach")
    p.add_argument("--blocks", type=int, default=1000, help="engine: blocks in the long session")
    p.add_argument("--batch-blocks", type=int, default=20, help="engine: blocks per session in the batching test")
    p.add_argument("--toy-blocks", type=int, default=100, help="engine: blocks of the toy-world overhead run")
    p.add_argument("--overlap-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="generate: decode on a worker thread beside the next passes (default: on with CUDA)")
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   help="generate: torch.compile mode for the DiT's fixed-shape parts (default: eager)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: 1 for the engine benchmark, whose tiny passes only lose "
                        "from threading, and 2 for generate)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available() or a.device == "cpu":
        torch.set_num_threads(a.threads or (1 if a.what == "engine" else 2))
    res = bench_generate(a) if a.what == "generate" else bench_engine(a)
    print(json.dumps(res, indent=2))
    return 0
