"""Sequence-parallel scaling: per-block latency and pixel frames/s at N = 1, 2, 4 ranks (Ulysses, inferix/parallel.py).

Each N runs under ``torchrun --standalone --nproc-per-node N`` (N = 1 too, so every figure has the same launch);
the ranks build the preset with random weights, open one text-to-video session (global attention, context growing
block by block) and time its blocks. A block is 4 denoising passes + 1 commit pass of the DiT; its latency is the
time between two consecutive finished blocks on rank 0, after --warmup untimed blocks. Pixel frames/s =
pixel frames one block decodes to (Wan VAE: 4 per latent frame) / median block latency; the VAE decode itself is
excluded (it is not parallelised: every rank decodes the same block). The communication share is the time rank 0
spent inside collectives (all-to-alls, gathers, the plan check; synchronised on CUDA) over the timed blocks'
time; on the CPU it includes waiting for slower ranks, and with more ranks than cores the ranks share them.
Prints JSON.

GPU (NCCL, one GPU per rank; bf16):
    python benchmarks/sp_bench.py --preset wan2.1-t2v-1.3b --ranks 1,2,4
    python benchmarks/sp_bench.py --preset wan2.1-t2v-14b --ranks 1,2,4
CPU (gloo; the path and its communication share, not a speed-up: the ranks share the cores):
    python benchmarks/sp_bench.py --preset tiny --device cpu --height 240 --width 416 --ranks 1,2,4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(a) -> None:
    import torch
    from inferix.engine import Engine
    from inferix.models.bundle import load_model
    from inferix.parallel import init_parallel

    par = init_parallel(a.n, timeout_s=600)
    device = str(par.device) if par is not None else a.device
    if device == "cpu":
        torch.set_num_threads(a.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    bundle = load_model(a.preset, device=device, dtype=dtype)
    dec = bundle.decoder
    bf = bundle.sampling.block_frames
    px_block = dec.pixel_frames(2 * bf) - dec.pixel_frames(bf) if dec is not None else 4 * bf
    bundle.decoder = None  # the DiT alone is timed
    blocks = a.warmup + a.blocks
    eng = Engine(bundle, device=device, height=a.height, width=a.width, window=None, attention=a.attention,
                 max_sessions=1, kv_pages=blocks * bf, parallel=par)
    cfg = bundle.dit.config
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(dtype)  # the same on every rank
    done = []

    def hook(plan, outs):
        if outs:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            done.append((time.perf_counter(), par.comm_s if par is not None else 0.0))

    eng.hooks.append(hook)
    sess = eng.open_session("", num_frames=blocks * bf, seed=0, init_frames=None, text_embeds=text)
    if par is not None:
        par.timed = True
    for _ in sess:
        pass
    (t0, c0), (t1, c1) = done[a.warmup - 1], done[-1]
    lat = [b[0] - p[0] for p, b in zip(done[a.warmup - 1:], done[a.warmup:])]
    med = statistics.median(lat)
    res = {"ranks": a.n, "per_block_s_median": med, "per_block_s": [round(x, 4) for x in lat],
           "pixel_frames_per_block": px_block, "pixel_fps": px_block / med,
           "comm_share": (c1 - c0) / (t1 - t0) if par is not None else 0.0,
           "kv_pool_bytes_per_rank": eng.pool.nbytes(), "heads_per_rank": eng.pool.k[0].shape[2],
           "tokens_per_block": bf * eng.pool.page_tokens, "device": torch.cuda.get_device_name() if
           device.startswith("cuda") else "cpu", "collectives": par.describe()["backend"] if par else None}
    if par is None or par.is_leader:
        print("RESULT " + json.dumps(res), flush=True)
    if par is not None:
        par.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wan2.1-t2v-1.3b", help="tiny, wan2.1-t2v-1.3b, wan2.1-t2v-14b")
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--device", default=None, help="cuda (NCCL, one GPU per rank) or cpu (gloo); default: cuda if any")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--attention", default="sdpa", choices=["reference", "sdpa", "triton"])
    p.add_argument("--warmup", type=int, default=1, help="untimed blocks first")
    p.add_argument("--blocks", type=int, default=4, help="timed blocks")
    p.add_argument("--threads", type=int, default=1, help="CPU: intra-op threads per rank (2 threads on a loaded "
                   "2-core machine measured several times slower than 1)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per N")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bench-ranks", dest="n", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import torch
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    if a.worker:
        worker(a)
        return 0
    out = {"preset": a.preset, "height": a.height, "width": a.width, "steps": "4 denoise + 1 commit per block",
           "attention": a.attention, "dtype": a.dtype, "timed_blocks": a.blocks, "runs": []}
    gpus = torch.cuda.device_count() if a.device == "cuda" else None
    env = dict(os.environ)
    if a.device == "cpu":
        env["INFERIX_DIST_BACKEND"] = "gloo"
        env["CUDA_VISIBLE_DEVICES"] = ""
    for n in [int(x) for x in a.ranks.split(",")]:
        if gpus is not None and n > gpus:
            out["runs"].append({"ranks": n, "skipped": f"{gpus} GPU(s) here"})
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               str(Path(__file__).resolve()), "--worker", "--bench-ranks", str(n), "--preset", a.preset,
               "--device", a.device,
               "--dtype", a.dtype, "--height", str(a.height), "--width", str(a.width), "--attention", a.attention,
               "--warmup", str(a.warmup), "--blocks", str(a.blocks), "--threads", str(a.threads)]
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            out["runs"].append({"ranks": n, "error": f"timed out after {a.timeout:g} s"})
            continue
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode or not lines:
            out["runs"].append({"ranks": n, "error": (r.stderr.strip().splitlines() or ["no output"])[-1][:500]})
            continue
        out["runs"].append(json.loads(lines[-1][len("RESULT "):]))
    base = next((x for x in out["runs"] if x.get("ranks") == 1 and "per_block_s_median" in x), None)
    for x in out["runs"]:
        if base is not None and "per_block_s_median" in x:
            x["speedup_vs_1"] = base["per_block_s_median"] / x["per_block_s_median"]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
