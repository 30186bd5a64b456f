"""Experiment (not part of the engine): distil the toy world's three-view mirror ensemble into a small per-frame
corrector that runs between the DiT's one-pass estimate and the commit.

The ensemble (`--mirrors hv,d,a`) lowers the agent error but costs three extra DiT passes per block. Here a
6-layer conv net (41 k parameters) learns to map the stream's own estimate of a frame (plus the frame before
it and the frame's action) to the ensemble's mean for that frame. Then single-pass rollouts apply it before each
commit. See docs/toyworld.md ("What it would take to meet the quality targets") for what it measured.

    python scripts/toyworld_corrector_experiment.py gen   --episodes 16 --frames 320 --out runs/corr  # pairs
    python scripts/toyworld_corrector_experiment.py train --steps 1500 --out runs/corr                # fit
    python scripts/toyworld_corrector_experiment.py eval  --with corrector --seeds 7-14 --out runs/corr
    python scripts/toyworld_corrector_experiment.py eval  --with none --seeds 7-14 --out runs/corr
    python scripts/toyworld_corrector_experiment.py eval  --with views --seeds 7-14 --out runs/corr

Pairs come from seeds 1000 and up, evaluation from the seeds given (7-14 by default), so the evaluation episodes
are held out. Rollouts are the engine-free ones (`inferix.models.toyworld.eval.rollout`); its ``combine`` hook
records the pairs and applies the corrector.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from inferix.models.schedule import SamplingConfig
from inferix.models.toyworld.data import to_latent
from inferix.models.toyworld.eval import DEFAULT_WEIGHTS, load_decoder, load_toyworld, rollout
from inferix.models.toyworld.metrics import eval_episode, rollout_metrics

PROMPTS = ["a red cube in a snowy field", "a cube in the desert", "a cube on the grass", "a cube in the forest",
           "a cube at night"]
CONTEXT = 8  # start frames from the simulator, as the engine's default


class Corrector(nn.Module):
    """frame' = frame + f(frame, previous frame, action one-hot); the last layer starts at zero (the identity)."""

    def __init__(self, channels: int = 32, layers: int = 6, actions: int = 5):
        super().__init__()
        self.actions = actions
        convs = [nn.Conv2d(3 + 3 + actions, channels, 3, padding=1)]
        convs += [nn.Conv2d(channels, channels, 3, padding=1) for _ in range(layers - 2)]
        self.convs = nn.ModuleList(convs)
        self.out = nn.Conv2d(channels, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, est, prev, act):  # est, prev [N, 3, H, W] latents in [-1, 1]; act [N] action ids
        a = F.one_hot(act, self.actions).float()[:, :, None, None].expand(-1, -1, *est.shape[2:])
        h = torch.cat([est, prev, a], 1)
        for c in self.convs:
            h = F.gelu(c(h))
        return est + self.out(h)

    def block(self, est, prev_last, acts):  # est [F, 3, H, W]: frame by frame, each after the corrected one before
        outs, prev = [], prev_last
        for j in range(est.shape[0]):
            prev = self(est[j:j + 1], prev[None], acts[j:j + 1])[0]
            outs.append(prev)
        return torch.stack(outs)


class Rollout:
    def __init__(self, weights=DEFAULT_WEIGHTS):
        self.dit, self.text, self.meta = load_toyworld(weights)
        self.decoder = load_decoder(weights, self.meta)
        self.sampling = SamplingConfig.from_dict(self.meta["sampling"])

    def run(self, seed: int, prompt: str, frames: int, views=(), corrector=None, collect=None) -> dict:
        """Agent-error summary of one episode, from the engine-free rollout. ``collect`` (a list): append one
        (own estimate, last committed frame, actions, views' mean) tuple per block. ``corrector``: applied to the
        estimate before each commit."""
        acts, true, pos = eval_episode(seed, prompt, CONTEXT + frames)
        last = [to_latent(true[CONTEXT - 1:CONTEXT])[0]]  # the frame committed last

        def combine(est, a):  # est [V, F, C, H, W]: the world's own estimate first, then the views' mapped back
            x0 = est.mean(0)
            if collect is not None:
                collect.append((est[0].half(), last[0].half(), a.clone(), x0.half()))
            if corrector is not None:
                x0 = corrector.block(x0, last[0], a)
            last[0] = x0.clamp(-1, 1)[-1]
            return x0
        with torch.no_grad():
            gen = np.concatenate(list(rollout(
                self.dit, self.text, self.sampling, prompt, true[:CONTEXT], acts[CONTEXT:], seed=seed,
                window=self.meta["window"], sink=self.meta["sink"], init_actions=acts[:CONTEXT],
                decoder=self.decoder, positions="relative", mirrors=views, combine=combine)))
        return rollout_metrics(gen, true[CONTEXT:], pos[CONTEXT:], true[:CONTEXT])["summary"]


def seeds_of(text: str) -> list[int]:
    a, b = (int(v) for v in text.split("-"))
    return list(range(a, b + 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=["gen", "train", "eval"])
    ap.add_argument("--out", default="runs/corr", help="folder for pairs.pt, corrector.pt and eval JSON")
    ap.add_argument("--episodes", type=int, default=16, help="gen: ensemble episodes (seeds 1000, 1001, ...)")
    ap.add_argument("--frames", type=int, default=320, help="gen: frames per episode; eval uses 1000")
    ap.add_argument("--steps", type=int, default=1500, help="train: steps of 16 frames")
    ap.add_argument("--with", dest="mode", choices=["none", "corrector", "views"], default="corrector")
    ap.add_argument("--seeds", default="7-14", help="eval: seeds A-B (prompts cycle through the five themes)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.cmd == "gen":
        r, data = Rollout(), []
        for e in tqdm(range(a.episodes), desc="ensemble episodes", unit="episode"):
            r.run(1000 + e, PROMPTS[e % 5], a.frames, views=("hv", "d", "a"), collect=data)
        torch.save({k: torch.stack([d[i] for d in data]) for i, k in enumerate(["est", "prev", "act", "mean"])},
                   out / "pairs.pt")
        print(f"wrote {len(data)} blocks to {out / 'pairs.pt'}")
    elif a.cmd == "train":
        d = torch.load(out / "pairs.pt", weights_only=True)
        n = d["est"].shape[0]
        torch.manual_seed(0)
        corr = Corrector()
        opt = torch.optim.Adam(corr.parameters(), 1e-3)
        ar = torch.arange(16)
        bar = tqdm(range(a.steps), desc="corrector", unit="step")
        for s in bar:
            idx = torch.randint(0, n, (16,))
            j = torch.randint(0, 4, (16,))
            est, prev, mean = d["est"][idx].float(), d["prev"][idx].float(), d["mean"][idx].float()
            # frame j's previous frame: the block's (mean) frame j-1, or the last committed frame for j = 0
            before = torch.where((j == 0)[:, None, None, None], prev, mean[ar, (j - 1).clamp(min=0)])
            tgt, e = mean[ar, j], est[ar, j]
            w = 1 + 10 * (tgt - e).abs().sum(1, keepdim=True).gt(0.1).float()  # where the views disagree
            loss = ((corr(e, before, d["act"][idx][ar, j]) - tgt) ** 2 * w).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if s % 100 == 0:
                bar.set_postfix(loss=f"{loss.item():.5f}", identity=f"{((e - tgt) ** 2 * w).mean().item():.5f}")
        torch.save(corr.state_dict(), out / "corrector.pt")
        print(f"wrote {out / 'corrector.pt'}")
    else:
        r, corr = Rollout(), None
        if a.mode == "corrector":
            corr = Corrector()
            corr.load_state_dict(torch.load(out / "corrector.pt", weights_only=True))
            corr.eval()
        rows = []
        for s in tqdm(seeds_of(a.seeds), desc=f"episodes ({a.mode})", unit="episode"):
            prompt = PROMPTS[(s - 7) % 5]
            t0 = time.perf_counter()
            m = r.run(s, prompt, 1000, corrector=corr, views=("hv", "d", "a") if a.mode == "views" else ())
            rows.append({"seed": s, "prompt": prompt, "agent_error_median_px": m["agent_error_median_px"],
                         "pixel_fps_including_refiner": 1000 / (time.perf_counter() - t0)})
            print(json.dumps(rows[-1]))
        meds = [x["agent_error_median_px"] for x in rows]
        summary = {"mode": a.mode, "episodes": rows, "mean_median_px": float(np.mean(meds)),
                   "under_2px": int(sum(m <= 2 for m in meds))}
        (out / f"eval_{a.mode}.json").write_text(json.dumps(summary, indent=1))
        print(f"{a.mode}: mean of the agent medians {summary['mean_median_px']:.2f} px, "
              f"{summary['under_2px']} of {len(meds)} under 2 px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
