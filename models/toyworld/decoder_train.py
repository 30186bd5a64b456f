"""Train the toy world's pixel refiner (the parts; ``inferix train toyworld-decoder`` in app/toyworld/train_decoder.py
drives them with an engine built on ``estimate_bundle``).

The DiT's few-step x0 estimate is soft where things move. The refiner (``models/pixel_decoder.PixelRefiner``) learns
to render it crisp from pairs (engine block made from the simulator's true frames, the true frames), made through
the engine with the bundle's own window, sink, positions and sampling. The DiT is not changed; the result is the
input bundle plus ``decoder.*`` weights and, with ``--denoising-steps``, another sampling schedule.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config import check_at_least
from ..pixel_decoder import PixelDecoder, PixelRefiner, reference_image
from . import simulator as sim

__all__ = ["RefinerConfig", "estimate_bundle", "make_pairs", "make_rollout_pairs", "rollout_targets", "episode_references", "pair_references",
           "train_refiner", "export_with_refiner"]


@dataclass
class RefinerConfig:
    episodes: int = 120  # simulator episodes the pairs from true context come from
    blocks: int = 24  # blocks per episode, each made from the true frames before it
    start_frames: int = 8  # true frames before the first block
    rollout_episodes: int = 96  # episodes rolled out on the model's own frames
    rollout_frames: int = 256
    steps: int = 3000
    batch: int = 32
    lr: float = 2e-3
    channels: int = 32
    layers: int = 6
    reference_frames: int = 8  # > 0: the refiner also reads the median of the stream's first K frames (0: it does not)
    self_reference_p: float = 0.1  # share of training frames whose reference is their own estimate (no start frames)
    seed: int = 0

    def __post_init__(self):
        check_at_least(self, "refiner config", {**dict.fromkeys(
            ("episodes", "blocks", "start_frames", "rollout_frames", "steps", "batch", "channels"), 1),
            "rollout_episodes": 0, "layers": 2, "reference_frames": 0})
        if not self.lr > 0:
            raise ValueError(f"refiner config: lr must be > 0, got {self.lr}")
        if self.reference_frames > self.start_frames:
            raise ValueError(f"refiner config: reference_frames ({self.reference_frames}) must not exceed start_frames "
                             f"({self.start_frames}): references are made from the true start frames")
        if not 0 <= self.self_reference_p <= 1:
            raise ValueError(f"refiner config: self_reference_p must lie in [0, 1], got {self.self_reference_p}")


def estimate_bundle(bundle):
    """The bundle with the identity as its decoder (any refiner left out): an engine built on it yields the DiT's
    estimate as frames, what a refiner is given. The DiT, sampling, cache settings and corrector are the bundle's."""
    return replace(bundle, decoder=PixelDecoder(3))


def _check_estimate_engine(engine) -> None:
    dec = engine.bundle.decoder
    if not isinstance(dec, PixelDecoder) or dec.refiner is not None:
        raise ValueError("pairs need an engine whose frames are the DiT's estimate: build it on "
                         "estimate_bundle(bundle), whose decoder is the identity")


def _episode(cfg: RefinerConfig, e: int, n: int):
    """Episode e of n frames: (seed, prompt, actions, frames, static scene); prompt (themes in turn) and actions
    from (cfg.seed, e)."""
    rng = np.random.default_rng([cfg.seed, e])
    themes = list(sim.THEMES)
    seed = int(rng.integers(2 ** 31))
    prompt = sim.random_prompt(rng, themes[e % len(themes)])
    acts = sim.random_actions(rng, n)
    frames, _, background = sim.simulate(seed, acts, prompt, n, return_background=True)
    return seed, prompt, acts, frames, background


def make_pairs(engine, cfg: RefinerConfig, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Blocks the engine makes from TRUE context, and the simulator's frames for them: uint8 [N, H, W, 3] twice.

    Episode e has a random prompt (themes in turn) and random actions, both from (cfg.seed, e). Its block b is
    generated after the sink frames and the window's latest frames of the truth, as the engine's cache would hold
    them after committing all true frames. ``engine`` decodes with the identity (``estimate_bundle``), so the pairs
    hold the DiT's estimate.
    """
    _check_estimate_engine(engine)
    bf, sink, window = engine.block_frames, engine.sink, engine.window
    if cfg.start_frames % bf:
        raise ValueError(f"start_frames {cfg.start_frames} is not a multiple of the block ({bf} frames)")
    if engine.positions != "relative" and window is not None:
        raise ValueError("pairs need an engine with cache-relative positions (the toy world's setting)")
    gen, true = [], []
    from tqdm import tqdm
    n = cfg.start_frames + cfg.blocks * bf
    for e in tqdm(range(cfg.episodes), desc="refiner pairs", unit="episode", disable=not progress):
        seed, prompt, acts, frames, _ = _episode(cfg, e, n)
        for b in range(cfg.start_frames, n, bf):
            keep = np.arange(b) if window is None else np.r_[0:min(sink, b), max(sink, b - (window - bf)):b]
            it = engine.generate(prompt, num_frames=bf, seed=seed + b, init_frames=frames[keep],
                                 actions=[int(a) for a in acts[b:b + bf]])
            gen.append(np.concatenate(list(it)))
            true.append(frames[b:b + bf])
    return np.concatenate(gen), np.concatenate(true)


def rollout_targets(gen: np.ndarray, background: np.ndarray, margin: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Targets for a long rollout's raw frames gen uint8 [T, H, W, 3] of an episode with static scene background
    [H, W, 3]: the scene with the agent and the ball drawn where the model put them (their colour's centroid in
    gen, snapped to where the simulator can draw them: the agent's 2-px lattice, whole pixels for the ball), or
    left out where gen has none. Far into a rollout the model's agent is no longer where the simulator's is, so
    the simulator's frame would ask the refiner to move it; this target asks it only to draw it crisp, and to
    clear the haze around it. Returns (targets uint8 [T, H, W, 3], weight bool [T, H, W]): the weight is 0 within
    ``margin`` px of agent- or ball-coloured pixels that are too few to count as a drawn object (neither target
    is sure there), 1 elsewhere."""
    from .metrics import detect_color
    g = np.asarray(gen)
    if g.ndim != 4 or g.shape[1:] != background.shape:
        raise ValueError(f"gen must be [T, {', '.join(map(str, background.shape))}], got {list(g.shape)}")
    agent, ball = detect_color(g, sim.AGENT_COLOR), detect_color(g, sim.BALL_COLOR)
    lo, a_hi, b_hi = sim.WALL, sim.SIZE - sim.WALL - sim.AGENT_SIZE, sim.SIZE - sim.WALL - sim.BALL_DIAMETER
    targets = np.empty_like(g)
    for t in range(len(g)):
        a = None if np.isnan(agent[t, 0]) else np.clip(np.round((agent[t] - sim.AGENT_SIZE / 2) / 2) * 2, lo, a_hi)
        b = None if np.isnan(ball[t, 0]) else np.clip(np.round(ball[t] - sim.BALL_DIAMETER / 2), lo, b_hi)
        targets[t] = sim.draw_sprites(background, a, b)
    # Each pixel's nearest colour among the scene's, the agent's and the ball's.
    colors = np.concatenate([np.asarray([sim.AGENT_COLOR, sim.BALL_COLOR], np.float32),
                             np.unique(background.reshape(-1, 3), axis=0).astype(np.float32)])
    gf = g.astype(np.float32)
    nearest = np.argmin([((gf - c) ** 2).sum(-1) for c in colors], axis=0)  # [T, H, W]: 0 agent, 1 ball, 2.. scene
    unsure = ((nearest == 0) & np.isnan(agent[:, 0])[:, None, None]) | \
        ((nearest == 1) & np.isnan(ball[:, 0])[:, None, None])
    k = 2 * margin + 1
    grown = torch.nn.functional.max_pool2d(torch.as_tensor(unsure, dtype=torch.float32)[:, None], k, 1, margin)
    return targets, grown[:, 0].numpy() == 0


def make_rollout_pairs(engine, cfg: RefinerConfig, progress: bool = True):
    """Rollouts on the model's own frames (rollout_frames after start_frames true ones; random prompt and actions
    from (cfg.seed, 10_000 + e)) with targets and a per-pixel weight (``rollout_targets``): uint8 [N, H, W, 3]
    twice, bool [N, H, W]. These pairs teach the refiner what the model's own frames look like far into a stream
    (haze, speckle, a soft agent in a place of its own), which blocks made from true context never show.
    ``engine`` decodes with the identity (``estimate_bundle``).
    """
    _check_estimate_engine(engine)
    gen, target, weight = [], [], []
    from tqdm import tqdm
    n = cfg.start_frames + cfg.rollout_frames
    for e in tqdm(range(cfg.rollout_episodes), desc="refiner rollouts", unit="episode", disable=not progress):
        seed, prompt, acts, frames, background = _episode(cfg, 10_000 + e, n)
        g = np.concatenate(list(engine.generate(prompt, num_frames=cfg.rollout_frames, seed=seed,
                                                init_frames=frames[:cfg.start_frames],
                                                actions=[int(a) for a in acts[cfg.start_frames:]])))
        tg, w = rollout_targets(g, background)
        gen.append(g)
        target.append(tg)
        weight.append(w)
    return np.concatenate(gen), np.concatenate(target), np.concatenate(weight)


def episode_references(starts: np.ndarray, k: int) -> np.ndarray:
    """Reference images of episodes whose first frames are starts uint8 [E, T0 >= k, H, W, 3]: uint8 [E, H, W, 3],
    the ``reference_image`` of each episode's first k frames (what the engine's decoder stream computes from the
    same start frames)."""
    from .data import to_latent, to_pixels
    s = np.asarray(starts)
    if s.ndim != 5 or s.shape[1] < k or k < 1:
        raise ValueError(f"starts must be uint8 [E, T0 >= {k}, H, W, 3], got {list(s.shape)}")
    return np.stack([to_pixels(reference_image(to_latent(e[:k]))[None])[0] for e in s])


def pair_references(cfg: RefinerConfig, block_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """For the pairs of ``make_pairs`` followed by those of ``make_rollout_pairs`` (same cfg): (table uint8
    [E, H, W, 3] of the episodes' reference images, index int [N] of each pair's episode), for ``train_refiner``."""
    if cfg.reference_frames < 1:
        raise ValueError("pair_references needs cfg.reference_frames >= 1")
    n = cfg.start_frames + cfg.blocks * block_frames
    starts = [_episode(cfg, e, n)[3][:cfg.start_frames] for e in range(cfg.episodes)]
    index = [np.repeat(np.arange(cfg.episodes), cfg.blocks * block_frames)]
    if cfg.rollout_episodes:
        n = cfg.start_frames + cfg.rollout_frames
        starts += [_episode(cfg, 10_000 + e, n)[3][:cfg.start_frames] for e in range(cfg.rollout_episodes)]
        index.append(cfg.episodes + np.repeat(np.arange(cfg.rollout_episodes), cfg.rollout_frames))
    return episode_references(np.stack(starts), cfg.reference_frames), np.concatenate(index)


def train_refiner(gen: np.ndarray, true: np.ndarray, cfg: RefinerConfig, progress: bool = True,
                  device="cpu", weight: np.ndarray | None = None,
                  ref: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[PixelRefiner, list[float]]:
    """L1 regression of the true frame from the estimate (L1: where the estimate is unsure, the median edge, not
    the mean blur), pixels weighted by ``weight`` (bool or float [N, H, W]; default all 1). Returns the refiner
    and its loss per step.

    With ``cfg.reference_frames`` > 0, ``ref`` = (table uint8 [E, H, W, 3] of reference images, index int [N]: each
    pair's row) gives each pair its reference; a share ``cfg.self_reference_p`` of frames gets its own estimate
    instead, as a stream without start frames would."""
    if gen.shape != true.shape or gen.ndim != 4 or gen.shape[-1] != 3:
        raise ValueError(f"pairs must be two uint8 [N, H, W, 3] stacks of one shape, got {gen.shape} and {true.shape}")
    if weight is not None and weight.shape != gen.shape[:3]:
        raise ValueError(f"weight must be [N, H, W] = {gen.shape[:3]}, got {weight.shape}")
    if cfg.reference_frames:
        if ref is None:
            raise ValueError(f"reference_frames={cfg.reference_frames} needs each pair's reference image (ref=)")
        table, index = np.asarray(ref[0]), np.asarray(ref[1])
        if table.ndim != 4 or table.shape[1:] != gen.shape[1:] or index.shape != (len(gen),) or \
                (len(index) and not 0 <= index.min() <= index.max() < len(table)):
            raise ValueError(f"ref must be (table uint8 [E, {', '.join(map(str, gen.shape[1:]))}], index [N={len(gen)}]"
                             f" into it), got {list(table.shape)} and {list(index.shape)}")
        rt = torch.as_tensor(table).permute(0, 3, 1, 2).contiguous()
        ri = torch.as_tensor(index, dtype=torch.long)
    elif ref is not None:
        raise ValueError("ref given but reference_frames is 0")
    wt = None if weight is None else torch.as_tensor(np.asarray(weight, np.float32))[:, None]
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = PixelRefiner(cfg.channels, cfg.layers, cfg.reference_frames).to(device)
    x = torch.as_tensor(gen).permute(0, 3, 1, 2).contiguous()
    y = torch.as_tensor(true).permute(0, 3, 1, 2).contiguous()
    opt = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    from tqdm import tqdm
    losses, ema = [], None
    bar = tqdm(range(cfg.steps), desc="refiner", mininterval=5.0, disable=not progress)
    for step in bar:
        i = torch.randint(len(x), (cfg.batch,), generator=g)
        xb = (x[i].float() / 127.5 - 1).to(device)
        yb = (y[i].float() / 127.5 - 1).to(device)
        wb = None if wt is None else wt[i].to(device)
        rb = None
        if cfg.reference_frames:
            rb = (rt[ri[i]].float() / 127.5 - 1).to(device)
            own = torch.rand(cfg.batch, generator=g) < cfg.self_reference_p
            rb[own.to(device)] = xb[own.to(device)]
        if step % 2:  # mirrored pairs: the world has no preferred side
            xb, yb = xb.flip(-1), yb.flip(-1)
            wb = None if wb is None else wb.flip(-1)
            rb = None if rb is None else rb.flip(-1)
        err = (model(xb, rb) - yb).abs()
        loss = err.mean() if wb is None else (err * wb).sum() / (wb.sum() * 3).clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        ema = losses[-1] if ema is None else 0.98 * ema + 0.02 * losses[-1]
        if step % 50 == 0:
            bar.set_postfix(l1=f"{ema:.4f}")
    return model.cpu().eval(), losses


def export_with_refiner(src: Path, refiner: PixelRefiner, out_json: Path, *, sampling: dict | None = None,
                        info: dict | None = None) -> Path:
    """The bundle ``src`` (json + safetensors) with ``refiner`` as its decoder, written to ``out_json`` (+ its
    .safetensors); ``sampling`` replaces the bundle's sampling section."""
    from safetensors.torch import load_file
    from ..bundle import save_bundle
    src, out_json = Path(src), Path(out_json)
    meta = json.loads(src.read_text())
    sd = {k: v for k, v in load_file(str(src.with_suffix(".safetensors"))).items() if not k.startswith("decoder.")}
    sd.update({f"decoder.{k}": v.detach().contiguous() for k, v in refiner.state_dict().items()})
    meta["decoder"] = {"type": "pixel", "refiner": refiner.config()}
    if sampling is not None:
        meta["sampling"] = sampling
    if info is not None:
        meta["decoder_train"] = info
    return save_bundle(sd, meta, out_json)
