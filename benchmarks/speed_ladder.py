"""Speed ladder: one model shape, every speed option side by side with a plain reference loop; prints JSON.

    python benchmarks/speed_ladder.py --preset wan2.1-t2v-1.3b --frames 81          # on a GPU (gpu_check.sh)
    python benchmarks/speed_ladder.py --preset tiny --frames 33 --rungs reference,engine,overlap,compile

Rungs (each a fresh engine on the same weights, a warm-up session first, then one timed session):
  reference  a plain Self-Forcing loop: dense per-layer K/V tensors (no pages), global attention over everything
             cached, absolute RoPE positions, the preset's steps + one commit pass per block, Wan VAE decode
             in line; no scheduler, no paging
  engine     Inferix eager: paged cache, SDPA backend, decode in line
  overlap    + decode on a worker thread / side CUDA stream
  compile    + torch.compile of the DiT's fixed-shape halves (mode "default")
  graphs     + whole-pass CUDA graphs of steady-state passes (CUDA only; needs a window)
  fp8        + FP8 block Linears (torchao on SM89+ GPUs; emulated elsewhere, which is slower)
  taehv      + the TAEHV decoder instead of the Wan VAE (random weights in the published layout)
Every figure is pixel frames per second of the timed session including decode (frames / wall time from the
request to the last frame), time to first frame from the request, and per-block latency (p50 over all blocks;
p50 of the first 10 and of the last 10 blocks, so a latency that grows along the stream shows).
Weights are random: the figures measure speed, not quality.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

RUNGS = ["reference", "engine", "overlap", "compile", "graphs", "fp8", "taehv"]


class DenseCache:
    """The reference loop's attention backend: per-layer K/V tensors [1, max_tokens, H, D] filled in order."""
    name = "dense-reference"

    def __init__(self, layers: int, max_tokens: int, heads: int, dim: int, dtype, device):
        shape = (1, max_tokens, heads, dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.end = 0  # tokens committed
        self.write = False  # a commit pass: store this block's K/V at [end, end + L)

    def _store(self, k, v, layer):
        L = k.shape[1]
        self.k[layer][:, self.end:self.end + L] = k
        self.v[layer][:, self.end:self.end + L] = v

    def attend(self, q, k, v, layer, meta, k_raw=None):
        if self.write:
            self._store(k, v, layer)
        keys = torch.cat([self.k[layer][:, :self.end], k], 1)
        vals = torch.cat([self.v[layer][:, :self.end], v], 1)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2),
                                                               vals.transpose(1, 2))
        return out.transpose(1, 2)

    def write_kv(self, k, v, layer, meta, k_raw=None):
        self._store(k, v, layer)


def reference_loop(bundle, frames: int, device) -> dict:
    """Self-Forcing's semantics with nothing of the engine: returns timings like the engine's profile."""
    from inferix.models.schedule import add_noise
    from inferix.sizing import pixel_to_latent
    dit, s, dec = bundle.dit, bundle.sampling, bundle.decoder
    cfg = dit.config
    bf = s.block_frames
    n_lat = pixel_to_latent(bundle, frames)
    blocks = -(-n_lat // bf)
    h, w = bundle.height // bundle.spatial_ratio, bundle.width // bundle.spatial_ratio
    tokens = dit.tokens_per_frame(h, w)
    dtype = next(dit.parameters()).dtype
    cache = DenseCache(cfg.num_layers, blocks * bf * tokens, cfg.num_heads, cfg.head_dim, dtype, device)
    text = dit.prepare_text(bundle.encode_prompt("a corgi running on a beach").to(device))
    sig = s.sigmas()
    gen = torch.Generator(device="cpu").manual_seed(0)
    stream = dec.new_stream() if dec is not None else None
    t0 = time.perf_counter()
    first, lat, out = None, [], 0
    for b in range(blocks):
        tb = time.perf_counter()
        pos = torch.arange(b * bf, (b + 1) * bf, device=device)[None]
        x = torch.randn((1, bf, cfg.in_dim, h, w), generator=gen).to(device)
        cache.write = False
        for step, t in enumerate(s.timesteps):
            tt = torch.full((1, bf), float(t), device=device)
            with torch.no_grad():
                x0 = dit(x, tt, text, frame_pos=pos, backend=cache, meta=object())
            if cfg.prediction != "x0":
                from inferix.models.schedule import flow_to_x0
                x0 = flow_to_x0(x, x0, sig[step])
            if step + 1 < len(s.timesteps):
                x = add_noise(x0, torch.randn(x0.shape, generator=gen).to(device), sig[step + 1])
        cache.write = True  # the commit pass at the context timestep
        with torch.no_grad():
            dit(x0, torch.full((1, bf), float(s.context_timestep), device=device), text, frame_pos=pos,
                backend=cache, meta=object())
        cache.end += bf * tokens
        if stream is not None:
            px = dec.decode_block(stream, x0)
            out += len(px)
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        first = first or now - t0
        lat.append(now - tb)
    wall = time.perf_counter() - t0
    return {"pixel_frames": out, "wall_s": wall, "pixel_fps_including_decode": out / wall,
            "time_to_first_frame_s": first, "block_latency_p50_s": statistics.median(lat),
            "block_latency_first10_p50_s": statistics.median(lat[:10]),
            "block_latency_last10_p50_s": statistics.median(lat[-10:])}


def engine_rung(bundle, rung: str, frames: int, device, window) -> dict:
    from inferix.engine import Engine
    from inferix.sizing import pool_pages
    opts = {"overlap_decode": rung != "engine"}
    ladder = RUNGS.index(rung)
    if ladder >= RUNGS.index("compile"):
        opts["compile"] = "default"
    if ladder >= RUNGS.index("graphs") and device.type == "cuda" and window is not None:
        opts["cuda_graphs"] = True
    if ladder >= RUNGS.index("fp8"):
        opts["fp8"] = True
    pages = max(pool_pages(bundle, window, 1, frames), pool_pages(bundle, window, 1, 33))
    eng = Engine(bundle, device=device, window=window, max_sessions=1, kv_pages=pages, **opts)
    for _ in eng.generate("warm up", num_frames=min(frames, 33)):
        pass
    eng.profiler.__init__(eng)
    lat, t0, last, n = [], time.perf_counter(), None, 0
    first = None
    for block in eng.generate("a corgi running on a beach", num_frames=frames, seed=0):
        now = time.perf_counter()
        first = first or now - t0
        lat.append(now - (last or t0))
        last = now
        n += len(block)
    wall = time.perf_counter() - t0
    prof = eng.stats()
    return {"pixel_frames": n, "wall_s": wall, "pixel_fps_including_decode": n / wall,
            "time_to_first_frame_s": first, "block_latency_p50_s": statistics.median(lat),
            "block_latency_first10_p50_s": statistics.median(lat[:10]),
            "block_latency_last10_p50_s": statistics.median(lat[-10:]),
            "options": {k: v for k, v in opts.items()}, "time_split_s": prof["time_split_s"],
            "compiled_graphs": prof["compiled_graphs"], "cuda_graphs": prof["cuda_graphs"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="default: wan2.1-t2v-1.3b on CUDA, tiny on the CPU")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--window", type=int, default=0, help="latent frames attended by the engine rungs (0: global "
                   "attention, as the reference loop; -1: the model's own; CUDA graphs need a window)")
    p.add_argument("--rungs", default=",".join(RUNGS))
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    from inferix.models.bundle import load_model
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = a.preset or ("wan2.1-t2v-1.3b" if device.type == "cuda" else "tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rungs = [r.strip() for r in a.rungs.split(",") if r.strip()]
    bad = [r for r in rungs if r not in RUNGS]
    if bad:
        p.error(f"unknown rungs {bad}; known: {RUNGS}")
    res = {"benchmark": "speed ladder", "preset": preset, "device": str(device), "frames": a.frames,
           "window": a.window or None, "weights": "random" if preset != "toyworld" else "the shipped toy world", "note": __doc__.split("Every figure")[1].strip(),
           "rungs": {}}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    for rung in rungs:
        bundle = load_model(preset, device=device, dtype=dtype)  # fresh weights: fp8/compile change them
        try:
            if rung == "reference":
                res["rungs"][rung] = reference_loop(bundle, a.frames, device)
                continue
            if rung == "taehv":
                from inferix.models.taehv import TAEHVDecoder
                bundle.decoder = TAEHVDecoder.random(seed=0).to(device=device, dtype=dtype)
            window = bundle.window if a.window == -1 else (a.window or None)
            res["rungs"][rung] = engine_rung(bundle, rung, a.frames, device, window)
        except Exception as e:  # noqa: BLE001 - one rung's failure is reported, the others still run
            res["rungs"][rung] = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps({rung: res["rungs"][rung]}), flush=True, file=__import__("sys").stderr)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
