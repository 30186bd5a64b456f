"""The action corrector's training pairs, made by the engine (``inferix train toyworld-corrector``).

The corrector learns to move the world's one-pass estimate of a block to what the mirror-view ensemble commits. So
each episode runs through an engine on the bundle with its mirror views on, from simulator start frames and a
random player's actions, and a recording adapter (``PairRecorder``, the toy world's adapter plus a record) keeps,
per finished block, the world's own estimate, the frame committed before the block, the block's actions and the
views' mean. The stream is the engine's own in every other respect (window, sink, positions, sampling, the start
frames committed as any given frames are, the clamp), so the pairs come from the situations the corrector meets.
"""
from __future__ import annotations

import torch

from inferix.engine import Engine
from inferix.models.bundle import load_model
from inferix.models.corrector import ActionCorrector
from inferix.models.toyworld import simulator as sim
from inferix.models.toyworld.adapter import ToyWorldAdapter
from inferix.models.toyworld.corrector_train import CorrectorConfig, episode
from inferix.models.toyworld.decoder_train import estimate_bundle

__all__ = ["PairRecorder", "pair_engine", "collect_pairs"]


class PairRecorder(ToyWorldAdapter):
    """The toy world's adapter, recording (estimate, previous frame, actions, views' mean) per finished block.

    ``trained``: a corrector being trained; when set, each block commits what it makes of the world's own estimate
    instead of the views' mean, so the rollouts go where a stream with that corrector goes (the next round's
    pairs teach the corrector there). The views still run: their mean is the target."""

    def __init__(self, bundle):
        super().__init__(bundle)
        self.pairs: list = []  # (est, prev, act, mean): float16 [F, 3, H, W], [3, H, W], int64 [F], float16 [F, ...]
        self.trained: ActionCorrector | None = None
        self._step = None  # (own, mean) of the latest denoise step

    def combine(self, own, extras: list):
        mean = super().combine(own, extras)
        self._step = (own, mean)
        return mean if self.trained is None else own

    def finish_block(self, x0s: list, previous: list, actions):
        own, mean = self._step
        if len(x0s) != 1 or own.shape[0] != 1 or previous[0] is None:
            raise RuntimeError("pairs are recorded from one stream at a time that starts from given frames")
        self.pairs.append((own[0].half(), previous[0].half(), actions[0].clone(), mean[0].half()))
        if self.trained is not None:
            x0s = list(self.trained.blocks(torch.stack(x0s), previous, actions))
        return super().finish_block(x0s, previous, actions)  # the clamp (the bundle's own corrector is off)


def pair_engine(weights, views: str) -> Engine:
    """An engine on the bundle ``weights`` (.json) whose frames are the DiT's estimate (no refiner: the pairs do
    not need the rendering), running the mirror views ``views`` (e.g. ``hv,d,a``), its adapter a ``PairRecorder``
    (``engine.adapter``), the bundle's own corrector off."""
    bundle = estimate_bundle(load_model(str(weights), device="cpu", dtype=torch.float32))
    bundle.adapter_class = PairRecorder
    return Engine(bundle, device="cpu", max_sessions=1, model_options={"mirrors": views, "corrector": "off"})


def collect_pairs(weights, cfg: CorrectorConfig, progress: bool = True, corrector: ActionCorrector | None = None,
                  round_: int = 0) -> dict:
    """The pairs of ``cfg.episodes`` episodes (round ``round_``'s, ``corrector_train.episode``): a dict of stacked
    blocks, ``est`` float16 [N, F, 3, H, W] (the world's own estimate), ``prev`` float16 [N, 3, H, W] (the frame
    committed before the block), ``act`` int64 [N, F] and ``mean`` float16 [N, F, 3, H, W] (the views' mean, the
    target). Blocks commit the views' mean, or with ``corrector`` what it makes of the world's estimate."""
    eng = pair_engine(weights, cfg.views)
    rec = eng.adapter
    rec.trained = corrector
    if cfg.start_frames % eng.block_frames:
        raise ValueError(f"start_frames {cfg.start_frames} is not a multiple of the block ({eng.block_frames} "
                         f"frames)")
    from tqdm import tqdm
    desc = "corrector pairs" + (f" (round {round_ + 1})" if cfg.rounds > 1 else "")
    for e in tqdm(range(cfg.episodes), desc=desc, unit="episode", disable=not progress):
        seed, prompt, acts = episode(cfg, e, round_)
        frames, _ = sim.simulate(seed, acts[:cfg.start_frames], prompt, cfg.start_frames)
        s = eng.open_session(prompt, num_frames=cfg.frames, seed=seed, init_frames=frames,
                             actions=[int(a) for a in acts[cfg.start_frames:]])
        for _ in s:
            pass
    return {k: torch.stack([r[i] for r in rec.pairs]) for i, k in enumerate(("est", "prev", "act", "mean"))}
