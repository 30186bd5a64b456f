"""Session snapshots: file size and save/restore time per latent frame of cache; prints JSON.

    python benchmarks/snapshot_bench.py                 # tiny preset (with its VAE) and the 1.3B shape (2 layers)
    python benchmarks/snapshot_bench.py --layers 30     # the whole 1.3B depth (minutes of CPU per block)

Each case runs one session until its window holds the pages it keeps, snapshots it at a block boundary
(``Session.snapshot``), then restores it into a fresh engine on the same weights (``Engine.restore``).
The 1.3B shape is the Wan2.1-1.3B DiT geometry (dim 1536, 12 heads x 128, 480x832 -> 1,560 tokens per latent
frame) with random weights, ``--layers`` deep, latents only (no VAE), one denoising step per block; K/V bytes per
latent frame grow linearly with depth, and the JSON gives the measured figures and the 30-layer ones they imply.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from inferix.engine import Engine


def _run_to_pages(eng, pages: int, **open_kw):
    s = eng.open_session("a corgi running on a beach", num_frames=None, seed=0, **open_kw)
    while not (len(eng.kv.held_pages(s.id)) >= pages and s.at_block_boundary):
        eng.step()
        s.poll()
    return s


def case(name: str, make_engine, pages: int) -> dict:
    eng = make_engine()
    s = _run_to_pages(eng, pages)
    held = len(eng.kv.held_pages(s.id))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.safetensors")
        eng2 = make_engine()
        from inferix.snapshot import model_identity
        t = time.perf_counter()
        model_identity(eng)
        identity_s = time.perf_counter() - t
        model_identity(eng2)
        t = time.perf_counter()
        s.snapshot(path)
        save_s = time.perf_counter() - t
        size = os.path.getsize(path)
        t = time.perf_counter()
        eng2.restore(path)
        restore_s = time.perf_counter() - t
    cfg = eng.dit.config
    kv_frame = 2 * cfg.num_layers * eng.pool.page_tokens * cfg.num_heads * cfg.head_dim * eng.pool.k[0].element_size()
    return {"case": name, "layers": cfg.num_layers, "resolution": f"{eng.width}x{eng.height}",
            "kv_dtype": str(eng.pool.k[0].dtype), "cache_pages": held, "file_bytes": size,
            "file_bytes_per_latent_frame": size / held, "kv_bytes_per_latent_frame": kv_frame,
            "save_s": save_s, "restore_s": restore_s, "save_s_per_latent_frame": save_s / held,
            "restore_s_per_latent_frame": restore_s / held, "model_identity_s": identity_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="depth of the 1.3B-shape DiT (30: the whole model)")
    p.add_argument("--skip-large", action="store_true", help="only the tiny preset")
    a = p.parse_args(argv)
    from inferix.models.bundle import ModelBundle, load_model
    from inferix.models.schedule import SamplingConfig
    from inferix.models.text_encoder import HashTextEncoder
    from inferix.models.wan_dit import CausalWanDiT, WanDiTConfig
    tiny = load_model("tiny")
    res = {"benchmark": "snapshot", "device": "cpu", "threads": torch.get_num_threads(),
           "includes": "save_s: Session.snapshot (K/V of every page of the block table, decoder stream, noise, "
                       "counters, history; checksum; file written and moved into place); restore_s: "
                       "Engine.restore into a fresh engine (read, checksum, settings and identity check against a "
                       "cached identity, page allocation, K/V written into the pool); model_identity_s: the one-off "
                       "sha256 over the weights, cached per engine",
           "cases": [case("tiny preset, window 6, with its VAE stream",
                          lambda: Engine(tiny, window=6, max_sessions=1), 6)]}
    if not a.skip_large:
        torch.manual_seed(0)
        cfg = WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=a.layers, freq_dim=256,
                           text_dim=4096, text_len=32)
        big = ModelBundle(name=f"wan2.1-1.3b-shape-{a.layers}-layers", dit=CausalWanDiT(cfg).eval(),
                          sampling=SamplingConfig(denoising_steps=[1000.0]),
                          text_encoder=HashTextEncoder(text_dim=4096, text_len=32), height=480, width=832)
        r = case("Wan2.1-1.3B shape, 480x832, window 6, latents only", lambda: Engine(big, window=6, max_sessions=1), 6)
        scale = 30 / a.layers
        r["implied_30_layers"] = {"kv_bytes_per_latent_frame": r["kv_bytes_per_latent_frame"] * scale,
                                  "save_s_per_latent_frame": r["save_s_per_latent_frame"] * scale,
                                  "restore_s_per_latent_frame": r["restore_s_per_latent_frame"] * scale,
                                  "note": "measured figures times 30 / layers: K/V bytes and copy time grow "
                                          "linearly with depth"}
        res["cases"].append(r)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
