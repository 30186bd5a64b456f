"""Train the toy world's action corrector (``models/corrector.ActionCorrector``); ``inferix train toyworld-corrector``
(app/toyworld/train_corrector.py) drives these parts.

The corrector is distilled from the mirror-view ensemble: episodes (``episode``) are rolled out through the engine
with the bundle's mirror views on (app/toyworld/corrector_pairs.py, above the engine: this package does not import
it), and every block gives a pair: the world's own one-pass estimate (with the frame committed before the block
and the block's actions) and the views' mean, which is what the ensemble commits. The corrector learns to map the
first to the second (``train_corrector``), so one pass plus the corrector commits about what the ensemble would, at
about one pass's cost.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import check_at_least
from ..corrector import ActionCorrector
from ..mirrors import parse_mirrors
from . import simulator as sim

__all__ = ["CorrectorConfig", "episode", "train_corrector", "export_with_corrector"]


@dataclass
class CorrectorConfig:
    episodes: int = 16  # ensemble rollouts the pairs come from
    frames: int = 320  # generated frames per episode
    start_frames: int = 8  # simulator frames each rollout starts from
    views: str = "hv,d,a"  # the mirror views whose mean is the target
    steps: int = 1500
    batch: int = 16  # frames per step
    lr: float = 1e-3
    channels: int = 32
    layers: int = 6
    disagreement_weight: float = 10.0  # extra loss weight where the views' mean differs from the estimate
    rounds: int = 1  # > 1: more pairs from rollouts that commit the last round's corrector, then train again on all
    seed: int = 0

    def __post_init__(self):
        check_at_least(self, "corrector config", {**dict.fromkeys(
            ("episodes", "frames", "start_frames", "steps", "batch", "channels", "rounds"), 1), "layers": 2,
            "disagreement_weight": 0})
        if not self.lr > 0:
            raise ValueError(f"corrector config: lr must be > 0, got {self.lr}")
        if not parse_mirrors(self.views):
            raise ValueError("corrector config: views must name at least one mirror view (e.g. hv,d,a)")


def episode(cfg: CorrectorConfig, e: int, round_: int = 0) -> tuple[int, str, np.ndarray]:
    """Episode e's (simulator seed, prompt, actions int64 [start_frames + frames]): a random player and a random
    prompt (the themes in turn), drawn from (cfg.seed, e) in the first round, (cfg.seed, round, e) in later ones."""
    rng = np.random.default_rng([cfg.seed, 20_000 + e] if round_ == 0 else [cfg.seed, round_, 20_000 + e])
    themes = list(sim.THEMES)
    seed = int(rng.integers(2 ** 31))
    prompt = sim.random_prompt(rng, themes[e % len(themes)])
    return seed, prompt, sim.random_actions(rng, cfg.start_frames + cfg.frames)


def train_corrector(pairs: dict, cfg: CorrectorConfig, progress: bool = True,
                    num_actions: int = len(sim.ACTIONS)) -> tuple[ActionCorrector, list[float], list[float]]:
    """Weighted squared regression of the views' mean from the estimate, one random frame of a random block per
    batch row; the frame before it is the frame committed before the block (frame 0) or the block's previous
    mean frame (what a trained corrector would have made). Returns the corrector, the loss per step and the
    identity's loss (the uncorrected estimate) on the same batches."""
    est, prev, act, mean = pairs["est"], pairs["prev"], pairs["act"], pairs["mean"]
    n, F = est.shape[:2]
    if prev.shape != (n, *est.shape[2:]) or act.shape != (n, F) or mean.shape != est.shape:
        raise ValueError(f"pairs must be est/mean [N, F, 3, H, W], prev [N, 3, H, W] and act [N, F]; got "
                         f"{list(est.shape)}, {list(mean.shape)}, {list(prev.shape)}, {list(act.shape)}")
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = ActionCorrector(cfg.channels, cfg.layers, num_actions)
    opt = torch.optim.Adam(model.parameters(), cfg.lr)
    rows = torch.arange(cfg.batch)
    from tqdm import tqdm
    losses, identity = [], []
    bar = tqdm(range(cfg.steps), desc="corrector", unit="step", mininterval=5.0, disable=not progress)
    model.train()
    for step in bar:
        i = torch.randint(0, n, (cfg.batch,), generator=g)
        j = torch.randint(0, F, (cfg.batch,), generator=g)
        m = mean[i].float()
        before = torch.where((j == 0)[:, None, None, None], prev[i].float(), m[rows, (j - 1).clamp(min=0)])
        tgt, e = m[rows, j], est[i].float()[rows, j]
        w = 1 + cfg.disagreement_weight * (tgt - e).abs().sum(1, keepdim=True).gt(0.1).float()
        loss = ((model(e, before, act[i][rows, j]) - tgt) ** 2 * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        identity.append(((e.clamp(-1, 1) - tgt) ** 2 * w).mean().item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.5f}", uncorrected=f"{np.mean(identity[-50:]):.5f}")
    return model.eval(), losses, identity


def export_with_corrector(src: Path, corrector: ActionCorrector, out_json: Path, *, info: dict | None = None,
                          cfg: CorrectorConfig | None = None) -> Path:
    """The bundle ``src`` (json + safetensors) with ``corrector`` (replacing any it had), written to ``out_json``
    (+ its .safetensors)."""
    from safetensors.torch import load_file
    from ..bundle import save_bundle
    src, out_json = Path(src), Path(out_json)
    meta = json.loads(src.read_text())
    if meta.get("dit", {}).get("num_actions") != corrector.actions:
        raise ValueError(f"{src}: the DiT takes {meta.get('dit', {}).get('num_actions')} actions, the corrector "
                         f"{corrector.actions}")
    sd = {k: v for k, v in load_file(str(src.with_suffix(".safetensors"))).items() if not k.startswith("corrector.")}
    sd.update({f"corrector.{k}": v.detach().contiguous() for k, v in corrector.state_dict().items()})
    meta["corrector"] = corrector.config()
    meta["corrector_train"] = {**({"config": asdict(cfg)} if cfg is not None else {}), **(info or {})}
    return save_bundle(sd, meta, out_json)
