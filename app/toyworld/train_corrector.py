"""``inferix train toyworld-corrector``: add a trained action corrector to a toy-world bundle.

The corrector is distilled from the bundle's own mirror-view ensemble: its pairs are made through the engine
(corrector_pairs.py), the training and export live in ``inferix.models.toyworld.corrector_train``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from inferix.models.toyworld.corrector_train import CorrectorConfig, export_with_corrector, train_corrector

from .bundle_options import add_config_options, config_from_options, source_bundle
from .corrector_pairs import collect_pairs

__all__ = ["main"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="inferix train toyworld-corrector", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toyworld", help="the bundle to add a corrector to: 'toyworld' or a bundle .json")
    ap.add_argument("--out", default="runs/toyworld_corrector", help="directory for the new bundle (toyworld.json)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_config_options(ap, CorrectorConfig)
    a = ap.parse_args(argv)
    cfg = config_from_options(ap, a, CorrectorConfig)
    if a.threads:
        torch.set_num_threads(a.threads)
    src = source_bundle(a.model)
    t_pairs = t_train = 0.0
    pairs, corr = None, None
    for r in range(cfg.rounds):  # round 1: rollouts commit the views' mean; later ones the last corrector's output
        t0 = time.perf_counter()
        with torch.no_grad():
            new = collect_pairs(src, cfg, corrector=corr, round_=r)
        pairs = new if pairs is None else {k: torch.cat([pairs[k], new[k]]) for k in pairs}
        t1 = time.perf_counter()
        corr, losses, identity = train_corrector(pairs, cfg)
        t_pairs, t_train = t_pairs + t1 - t0, t_train + time.perf_counter() - t1
        tail = min(100, len(losses))
        info = {"source": src.name, "blocks": int(pairs["est"].shape[0]), "rounds_done": r + 1,
                "loss_last_steps": round(float(np.mean(losses[-tail:])), 6),
                "uncorrected_loss_last_steps": round(float(np.mean(identity[-tail:])), 6),
                "pairs_s": round(t_pairs, 1), "train_s": round(t_train, 1)}
        if r + 1 < cfg.rounds:  # each earlier round's corrector as a bundle of its own, to compare rounds
            export_with_corrector(src, corr, Path(a.out) / f"round{r + 1}" / "toyworld.json", info=info, cfg=cfg)
    path = export_with_corrector(src, corr, Path(a.out) / "toyworld.json", info=info, cfg=cfg)
    print(f"{info['blocks']} blocks; weighted squared distance to the views' mean over the last {tail} steps: "
          f"corrected {info['loss_last_steps']:.5f}, uncorrected {info['uncorrected_loss_last_steps']:.5f}", flush=True)
    print(f"exported {path} and {path.with_suffix('.safetensors')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
