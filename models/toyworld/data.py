"""Toy-world training data: simulator clips as model tensors, made from (seed, step) alone.

``make_batch(cfg, step)`` is the batch of step ``step`` of a run (``cfg`` is a ``train.TrainConfig``);
``BatchPrefetcher`` makes the next ones in worker processes; ``corrupt_context`` perturbs clean context a
little (noise, blur) while it stays labelled clean.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import simulator as sim

__all__ = ["to_latent", "to_pixels", "rollout_blocks_at", "make_batch", "prefetch_job", "BatchPrefetcher",
           "corrupt_context"]

def to_latent(frames_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1] (latent = pixel / 127.5 - 1)."""
    f = frames_u8 if isinstance(frames_u8, torch.Tensor) else torch.as_tensor(np.asarray(frames_u8))
    return (f.float() / 127.5 - 1).movedim(-1, -3)


def to_pixels(latent: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] -> uint8 [..., H, W, 3] (clamped, rounded: the engine's pixel decoder)."""
    x = ((latent.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def rollout_blocks_at(cfg, step: int) -> int:
    """How many blocks batch ``step`` rolls out before its clip (0: plain teacher forcing); from (seed, step) only."""
    if cfg.rollout_p <= 0:
        return 0
    rng = np.random.default_rng([cfg.seed, step, 11])  # own stream: plain batches stay those of a run without it
    if rng.random() >= cfg.rollout_p:
        return 0
    lo = max(1, cfg.clip_blocks - cfg.sink_blocks - 1) if cfg.sink_blocks else 1
    return int(rng.integers(lo, cfg.rollout_max_blocks + 1))


def make_batch(cfg, step: int, extra_blocks: int = 0) -> dict:
    """Batch ``step`` of a run: clips of clip_blocks * block_frames frames, drawn from (seed, step) only.

    ``extra_blocks`` > 0 lengthens every clip by that many blocks in front (the frames a rollout starts from).

    With ``cfg.sink_blocks`` the clip is [the episode's first sink_blocks blocks | the rest from frame ``start``]
    and ``gap`` [B] holds start - sink frames. With a sink and ``extra_blocks`` = d, the episode's frames
    0 .. sink + (d + 1) * block_frames are returned whole (the rollout starts after the sink) and ``gap`` is
    where the clip's part after the sink will start once the rollout has made its context.
    """
    rng = np.random.default_rng([cfg.seed, step, 7])
    bounce_rng = np.random.default_rng([cfg.seed, step, 13])  # own stream: without bounce_p batches are unchanged
    bf, S = cfg.block_frames, cfg.sink_blocks * cfg.block_frames
    F_ = (cfg.clip_blocks + extra_blocks) * bf
    R = (cfg.clip_blocks - cfg.sink_blocks) * bf  # frames after the sink
    frames, acts, dyn, prompts, gaps = [], [], [], [], []
    for _ in range(cfg.batch):
        ep_seed = int(rng.integers(2 ** 31))
        prompt = sim.random_prompt(rng)
        start = int(rng.integers(0, cfg.max_start + 1))
        if S:
            no_gap = rng.random() < cfg.p_no_gap
            if extra_blocks:
                start = S + (extra_blocks - (cfg.clip_blocks - cfg.sink_blocks - 1)) * bf
            elif no_gap or start < S:
                start = S
            n = start + R
        else:
            n = start + F_
        if cfg.bounce_p > 0 and bounce_rng.random() < cfg.bounce_p:
            ep_seed = _episode_bouncing_in(ep_seed, n - cfg.bounce_blocks * bf, n, bounce_rng)
        a = sim.random_actions(rng, n)
        fr, _, bg = sim.simulate(ep_seed, a, prompt, n, return_background=True)
        moving = (fr != bg[None]).any(-1)  # [n, H, W]: agent or ball pixels
        was = np.concatenate([np.zeros_like(moving[:1]), moving[:-1]])  # uncovered when they move away
        dyn_ep = moving | was
        if S and not extra_blocks:
            keep = np.r_[0:S, start:n]
        elif S:
            keep = np.arange(n)
        else:
            keep = np.arange(start, n)
        frames.append(fr[keep])
        acts.append(a[keep])
        dyn.append(dyn_ep[keep])
        prompts.append(prompt)
        gaps.append(start - S if S else 0)
    return {"x0": to_latent(np.stack(frames)),  # [B, F, 3, H, W]
            "actions": torch.as_tensor(np.stack(acts)),  # [B, F]
            "dynamic": torch.as_tensor(np.stack(dyn)),  # bool [B, F, H, W]
            "gap": torch.as_tensor(gaps),  # [B]
            "prompts": prompts}


def _episode_bouncing_in(ep_seed: int, t0: int, t1: int, rng: np.random.Generator, tries: int = 64) -> int:
    """The first of ep_seed and fresh seeds from rng whose ball bounces off the wall in frames [t0, t1) (the
    clip's last blocks: the last one always gets a loss, the ones before it are its context, in rollout batches
    made by the model); ep_seed itself if none of ``tries`` seeds does."""
    seed = ep_seed
    for _ in range(tries):
        _, bounced = sim.World(seed).ball_path(t1)
        if bounced[t0:t1].any():
            return seed
        seed = int(rng.integers(2 ** 31))
    return ep_seed


def prefetch_job(cfg, step: int) -> dict:
    """Batch ``step`` as ``make_batch`` makes it for the trainer, frames as uint8 (a quarter of the bytes to move
    between processes); ``to_latent`` of them gives the same floats bit for bit."""
    b = make_batch(cfg, step, extra_blocks=rollout_blocks_at(cfg, step))
    b["x0"] = torch.from_numpy(to_pixels(b["x0"]))
    b["step"] = step
    return b


class BatchPrefetcher:
    """Simulates the batches of the next steps in worker processes while the trainer runs the current one.

    Batches are a function of (config, step) alone, so a run with workers sees exactly the batches of a run
    without them. ``get(step)`` returns that step's batch (``prefetch_job``) and keeps ``depth`` steps queued.
    """

    def __init__(self, cfg, workers: int, depth: int | None = None):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.cfg, self.depth = cfg, depth or 2 * workers
        # spawn: the workers never inherit a CUDA context or the trainer's threads
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self.pending: dict[int, object] = {}

    def get(self, step: int) -> dict:
        for s in range(step, step + self.depth + 1):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(prefetch_job, self.cfg, s)
        for s in [s for s in self.pending if s < step]:  # a resumed or skipped range: drop stale work
            self.pending.pop(s).cancel()
        return self.pending.pop(step).result()

    def close(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


def _box_blur(x: torch.Tensor) -> torch.Tensor:  # x [N, 3, H, W]
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def corrupt_context(x0: torch.Tensor, cfg, g: torch.Generator) -> torch.Tensor:
    """Small perturbations of clean context (labelled clean): per clip, noise and/or blur with random strength.

    Random numbers come from the CPU generator ``g`` (the same on every device); the arithmetic runs on x0's device.
    """
    B, dev = x0.shape[0], x0.device
    sel = (torch.rand(B, generator=g) < cfg.p_corrupt).float()
    amp = (torch.rand(B, generator=g) * cfg.corrupt_noise * sel).to(dev)
    blur_mix = (torch.rand(B, generator=g) * 0.6 * sel * (torch.rand(B, generator=g) < 0.5).float()).to(dev)
    blurred = _box_blur(x0.flatten(0, 1)).view_as(x0)
    x = x0 + blur_mix.view(B, 1, 1, 1, 1) * (blurred - x0)
    return x + amp.view(B, 1, 1, 1, 1) * torch.randn(x0.shape, generator=g).to(dev)
