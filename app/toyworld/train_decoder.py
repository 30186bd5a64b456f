"""``inferix train toyworld-decoder``: add a trained pixel refiner to a toy-world bundle.

Pairs are made through an engine that decodes with the identity (the bundle's DiT, window, sink, positions and
sampling; its frames are the DiT's estimate); the parts live in ``inferix.models.toyworld.decoder_train``.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from inferix.engine import Engine
from inferix.models.bundle import load_model
from inferix.models.schedule import SamplingConfig
from inferix.models.toyworld.decoder_train import (RefinerConfig, estimate_bundle, export_with_refiner, make_pairs,
                                                   make_rollout_pairs, pair_references, train_refiner)

from .bundle_options import add_config_options, config_from_options, source_bundle

__all__ = ["main"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="inferix train toyworld-decoder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toyworld", help="the bundle to add a refiner to: 'toyworld' or a bundle .json")
    ap.add_argument("--out", default="runs/toyworld_decoder", help="directory for the new bundle (toyworld.json)")
    ap.add_argument("--denoising-steps", default=None,
                    help="comma-separated timesteps the new bundle samples with (pairs are made with them), "
                         "e.g. 1000 for one step; default: the bundle's own")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_config_options(ap, RefinerConfig)
    a = ap.parse_args(argv)
    cfg = config_from_options(ap, a, RefinerConfig)
    if a.threads:
        torch.set_num_threads(a.threads)
    src = source_bundle(a.model)
    sampling = json.loads(src.read_text())["sampling"]
    if a.denoising_steps:
        try:
            steps = [float(s) for s in a.denoising_steps.split(",")]
        except ValueError:
            ap.error(f"--denoising-steps must be comma-separated numbers, got {a.denoising_steps!r}")
        if not steps or any(not 0 < s <= sampling.get("num_train_timesteps", 1000) for s in steps):
            ap.error(f"--denoising-steps must lie in (0, {sampling.get('num_train_timesteps', 1000)}], got {steps}")
        sampling = {**sampling, "denoising_steps": steps}
    bundle = load_model(str(src), device="cpu", dtype=torch.float32,
                        sampling=SamplingConfig.from_dict(sampling, what="sampling"))
    eng = Engine(estimate_bundle(bundle), device="cpu", max_sessions=1)
    gen, true = make_pairs(eng, cfg)
    base = float(np.abs(gen.astype(np.float32) - true).mean() / 127.5)
    weight = None
    if cfg.rollout_episodes:
        rg, rt, rw = make_rollout_pairs(eng, cfg)
        weight = np.concatenate([np.ones(gen.shape[:3], bool), rw])
        gen, true = np.concatenate([gen, rg]), np.concatenate([true, rt])
    ref = pair_references(cfg, eng.block_frames) if cfg.reference_frames else None
    refiner, losses = train_refiner(gen, true, cfg, weight=weight, ref=ref)
    tail = float(np.mean(losses[-100:]))
    info = {"config": asdict(cfg), "pairs": int(len(gen)), "source": src.name,
            "l1_estimate_vs_truth_from_true_context": round(base, 5), "l1_refined_last_100_steps": round(tail, 5)}
    path = export_with_refiner(src, refiner, Path(a.out) / "toyworld.json", sampling=sampling, info=info)
    print(f"pairs {len(gen)}: L1 of the estimate from true context {base:.4f}, refined (last 100 steps) {tail:.4f}",
          flush=True)
    print(f"exported {path} and {path.with_suffix('.safetensors')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
