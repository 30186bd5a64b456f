"""CPU decode time per block: TAEHV (models/taehv.py) vs the Wan2.1 VAE, both with random weights, same latents.

Each decoder decodes one stream: a warm-up block (the stream's first, untimed), then ``--blocks`` timed blocks
that continue it; the figure is the median wall time of one ``decode_block(state, latents)`` call on a timed
block. Prints one JSON object on stdout (progress on stderr).

    .venv/bin/python benchmarks/decode_bench.py            # 64x64 both, 480x832 TAEHV only (~2-3 min, 2 cores)
    .venv/bin/python benchmarks/decode_bench.py --wan-large  # adds the Wan VAE at 480x832 (~15 min per block)

On a machine other processes also load, ``--threads 1`` gives steadier figures: with 2 threads each small op can
wait for a descheduled worker thread, which swamps the 64x64 timings.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

INCLUDES = ("wall time of one decode_block(state, latents) call on a stream that already decoded the warm-up "
            "block: latents [1, F, 16, h, w] (normalised) -> uint8 frames [4F, H, W, 3] as a numpy array; "
            "i.e. latent de-normalisation where the decoder needs it, the whole decoder forward with its "
            "temporal cache/memory, clamping, uint8 rounding and the copy to numpy. Excludes model "
            "construction, the warm-up block, making the random latents, and any DiT work.")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def time_stream(dec, h: int, w: int, frames: int, blocks: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(1, frames * (blocks + 1), 16, h, w, generator=g)
    state = dec.new_stream()
    tic = time.perf_counter()
    first = dec.decode_block(state, lat[:, :frames])
    warm = time.perf_counter() - tic
    times, out_frames = [], None
    for b in range(1, blocks + 1):
        tic = time.perf_counter()
        out = dec.decode_block(state, lat[:, b * frames:(b + 1) * frames])
        times.append(time.perf_counter() - tic)
        out_frames = out.shape
    med = statistics.median(times)
    return {
        "latent_block_shape": [1, frames, 16, h, w],
        "pixel_size_hw": [h * 8, w * 8],
        "warmup_block_s": round(warm, 4),
        "warmup_block_frames_out": int(first.shape[0]),
        "timed_blocks": blocks,
        "block_times_s": [round(t, 4) for t in times],
        "median_block_s": round(med, 4),
        "frames_out_per_timed_block": int(out_frames[0]),
        "output": f"uint8 {list(out_frames)}",
        "median_ms_per_pixel_frame": round(1000 * med / out_frames[0], 2),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=3, help="latent frames per block (default 3)")
    ap.add_argument("--blocks", type=int, default=3, help="timed blocks at the small size (default 3)")
    ap.add_argument("--large-blocks", type=int, default=2, help="timed blocks at 480x832 (default 2)")
    ap.add_argument("--small", type=int, nargs=2, default=(8, 8), metavar=("H", "W"),
                    help="small latent size (default 8 8 = 64x64 px)")
    ap.add_argument("--no-large", action="store_true", help="skip 480x832 (latent 60x104)")
    ap.add_argument("--wan-large", action="store_true", help="also time the Wan VAE at 480x832 (very slow on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from diffusers import AutoencoderKLWan
    from inferix.models.taehv import TAEHVDecoder
    from inferix.models.vae import WAN21_VAE_CONFIG, WanVAE

    t0, load0 = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    taehv = TAEHVDecoder.random(seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wan = WanVAE(AutoencoderKLWan(**WAN21_VAE_CONFIG))
    params = {"taehv": sum(p.numel() for p in taehv.decoder.parameters()),
              "wan_vae": sum(p.numel() for p in wan.model.decoder.parameters())
              + sum(p.numel() for p in wan.model.post_quant_conv.parameters())}
    runs = []
    sizes = [("small", tuple(a.small), a.blocks)]
    if not a.no_large:
        sizes.append(("large", (60, 104), a.large_blocks))
    for tag, (h, w), blocks in sizes:
        for name, dec in (("taehv", taehv), ("wan_vae", wan)):
            if name == "wan_vae" and tag == "large" and not a.wan_large:
                runs.append({"decoder": name, "size": tag, "pixel_size_hw": [h * 8, w * 8],
                             "skipped": "not run by default: minutes per latent frame on a 2-core CPU "
                                        "(--wan-large runs it)"})
                continue
            _log(f"{name} {h * 8}x{w * 8}: 1 warm-up + {blocks} timed blocks of {a.frames} latent frames ...")
            r = time_stream(dec, h, w, a.frames, blocks)
            runs.append({"decoder": name, "size": tag, **r})
            _log(f"  median {r['median_block_s']} s per block")
    speedup = {}
    for tag in ("small", "large"):
        by = {r["decoder"]: r for r in runs if r["size"] == tag and "median_block_s" in r}
        if len(by) == 2:
            speedup[tag] = round(by["wan_vae"]["median_block_s"] / by["taehv"]["median_block_s"], 2)
    print(json.dumps({
        "what": "CPU decode time per block, TAEHV vs Wan2.1 VAE (random weights, float32)",
        "includes": INCLUDES,
        "decoders": {
            "taehv": "models/taehv.py TAEHVDecoder.random(seed=0), variant 'taehv', frames_per_call=1 "
                     "(decoder only is timed; the encoder is not used)",
            "wan_vae": "models/vae.py WanVAE over diffusers AutoencoderKLWan(**WAN21_VAE_CONFIG), seed 0 "
                       "(the config load_model uses for the wan2.1 presets)",
        },
        "decoder_params": params,
        "wan_vae_over_taehv_speedup": speedup,
        "runs": runs,
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": _cpu_name(),
                "cpu_count": os.cpu_count(), "loadavg_at_start": load0,
                "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                "total_s": round(time.perf_counter() - t0, 1)},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
