"""Train the toy world model: a pixel-space causal Wan DiT, conditioned on actions and a prompt.

    python -m inferix.models.toyworld.train --steps 2000 --out runs/toyworld [--resume runs/toyworld] [--seed 0]
    python -m inferix.models.toyworld.train --init runs/toyworld --rollout-p 0.5 --lr 3e-4 --out runs/toyworld_ft

Data are made on the fly by the simulator; batch ``step`` is a pure function of (seed, step), so a run is
reproducible from its seed and a resumed run sees the same batches it would have seen without the break.

Training is teacher forcing over whole clips of ``clip_blocks`` blocks. One forward pass holds the clean clip
followed by a noised copy of every block (``TeacherForcingMeta``): clean block i sees clean blocks <= i (this is
exactly the engine's commit pass: clean x0 at the context timestep), noised block i sees clean blocks < i and
itself. So every block of the clip is a denoising target with a clean context at ``context_timestep``, the
situation the engine's sampler is in, and the loss is taken only on the noised copies. Clean context is
sometimes perturbed a little (noise, blur) while keeping its timestep, so that the model learns to read the
slightly imperfect blocks it will later have written itself.

The model predicts x0 (pixel patches of 192 values are wider than the 128-wide residual stream; predicting
velocity did not learn at this ratio, see docs/toyworld.md).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigBase
from ..wan_dit import CausalWanDiT, WanDiTConfig
from ...kernels.attention import SDPABackend, get_backend
from . import simulator as sim
from .data import (BatchPrefetcher, corrupt_context, make_batch, rollout_blocks_at, to_latent,  # noqa: F401
                   to_pixels)
from .rollout_context import OwnRollouts
from .teacher_forcing import TeacherForcingBackend, TeacherForcingMeta
from .export import bundle_tensors, default_sampling, export_bundle  # noqa: F401 (default_sampling re-exported)
from .text import LocalHashTextEncoder

__all__ = ["TrainConfig", "TeacherForcingMeta", "TeacherForcingBackend", "build_models", "Trainer", "export_bundle",
           "default_model_config", "default_sampling", "main",
           # re-exported from .data and .export
           "make_batch", "rollout_blocks_at", "to_latent", "to_pixels", "BatchPrefetcher"]

def default_model_config() -> WanDiTConfig:
    return WanDiTConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=6, in_dim=3, out_dim=3,
                        patch_size=(1, 8, 8), freq_dim=64, text_dim=32, text_len=16, num_actions=len(sim.ACTIONS),
                        prediction="x0")


@dataclass
class TrainConfig(ConfigBase):
    steps: int = 2000
    batch: int = 8
    clip_blocks: int = 3
    block_frames: int = 4
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.998
    seed: int = 0
    max_start: int = 160  # clips start at a random frame in [0, max_start] of their episode
    p_sigma_one: float = 0.4  # share of targets at pure noise (the first denoising step)
    first_block_weight: float = 0.3  # loss weight of block 0 (no context: text-to-world generation)
    dynamic_weight: float = 4.0  # extra loss weight on pixels where the agent or the ball is or just was
    p_corrupt: float = 0.5  # share of clips whose clean context is perturbed (noise, blur)
    corrupt_noise: float = 0.08
    context_timestep: float = 0.0
    text_vocab: int = 4096
    text_seed: int = 0
    model: dict = field(default_factory=lambda: default_model_config().to_dict())
    checkpoint_every_s: float = 240.0
    log_every: int = 25
    # Rollout fine-tuning (self-forcing style). With probability rollout_p a batch's context blocks are not the
    # true frames but the model's own 1-step rollout from true start blocks and the true actions, made exactly as
    # the engine makes them; the targets stay the simulator's frames. This teaches recovery from its own errors,
    # which teacher forcing never shows (rollouts on own frames otherwise collapse within ~32 frames).
    rollout_p: float = 0.0
    rollout_max_blocks: int = 6  # generated blocks before the clip's last block: uniform in [1, rollout_max_blocks]
    # Sink layout (sink_blocks > 0): the first sink_blocks blocks of every clip are the first frames of its
    # episode, the rest of the clip starts at a random later frame, and frame positions run on without the gap:
    # exactly what the engine's cache holds with a sink of sink_blocks blocks, a window of clip_blocks blocks and
    # cache-relative positions. The first block after a gap gets no loss (it only sees the sink); a share
    # p_no_gap of clips has no gap (the first generated blocks of a session). Rollouts then start right after
    # the sink, each generated block seeing the sink and the blocks generated just before it, as in the engine.
    sink_blocks: int = 0
    p_no_gap: float = 0.25
    # Share of clips whose episode is picked so that the ball bounces off the wall in the clip's last block (one
    # block in four has a bounce anyway; models trained without it still fly the ball on into the wall).
    bounce_p: float = 0.0
    bounce_blocks: int = 1  # the bounce falls in one of the clip's last bounce_blocks blocks (>1: also in context)

    def __post_init__(self):
        for k in ("steps", "batch", "clip_blocks", "block_frames"):
            if int(getattr(self, k)) <= 0:
                raise ValueError(f"{k} must be positive, got {getattr(self, k)}")
        if not 0 < self.ema < 1:
            raise ValueError(f"ema must be in (0, 1), got {self.ema}")
        if not 0 <= self.bounce_p <= 1:
            raise ValueError(f"bounce_p must be in [0, 1], got {self.bounce_p}")
        if not 1 <= int(self.bounce_blocks) <= int(self.clip_blocks) - int(self.sink_blocks):
            raise ValueError(f"bounce_blocks must be in [1, clip_blocks - sink_blocks = "
                             f"{int(self.clip_blocks) - int(self.sink_blocks)}], got {self.bounce_blocks}")
        if not 0 <= self.p_sigma_one <= 1:
            raise ValueError(f"p_sigma_one must be in [0, 1], got {self.p_sigma_one}")
        if not 0 <= self.rollout_p <= 1:
            raise ValueError(f"rollout_p must be in [0, 1], got {self.rollout_p}")
        if self.rollout_p > 0 and (int(self.rollout_max_blocks) < 1 or int(self.clip_blocks) < 2):
            raise ValueError(f"rollout needs rollout_max_blocks >= 1 and clip_blocks >= 2, got "
                             f"{self.rollout_max_blocks} and {self.clip_blocks}")
        if int(self.sink_blocks) < 0 or int(self.sink_blocks) > max(0, int(self.clip_blocks) - 2):
            raise ValueError(f"sink_blocks must leave at least 2 blocks of the clip after the sink: "
                             f"sink_blocks {self.sink_blocks}, clip_blocks {self.clip_blocks}")
        if int(self.sink_blocks) and self.rollout_p > 0 and \
                int(self.rollout_max_blocks) < int(self.clip_blocks) - int(self.sink_blocks) - 1:
            raise ValueError(f"with a sink, rollout_max_blocks must be >= the clip's blocks after the sink minus "
                             f"one ({int(self.clip_blocks) - int(self.sink_blocks) - 1}), got {self.rollout_max_blocks}")
        if self.sink_blocks and self.max_start < int(self.sink_blocks) * int(self.block_frames):
            raise ValueError(f"max_start {self.max_start} must be >= the sink's frames "
                             f"{int(self.sink_blocks) * int(self.block_frames)}")

    @property
    def model_config(self) -> WanDiTConfig:
        return WanDiTConfig.from_dict(dict(self.model), what="model config")


def build_models(cfg: TrainConfig) -> tuple[CausalWanDiT, LocalHashTextEncoder]:
    torch.manual_seed(cfg.seed)
    mc = cfg.model_config
    dit = CausalWanDiT(mc)
    text = LocalHashTextEncoder(mc.text_dim, mc.text_len, cfg.text_vocab, cfg.text_seed)
    return dit, text


class Trainer:
    def __init__(self, cfg: TrainConfig, device: str = "cpu", backend: str | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dit, self.text = build_models(cfg)
        self.dit.to(self.device)
        self.text.to(self.device)
        self.params = list(self.dit.parameters()) + list(self.text.parameters())
        self.ema = [p.detach().clone() for p in self.params]
        decay, no_decay = [], []
        for p in self.params:
            (decay if p.dim() >= 2 else no_decay).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
        self.backend = TeacherForcingBackend() if backend is None else get_backend(backend)
        self.rollout_backend = SDPABackend() if backend is None else self.backend
        self.step = 0
        self.wall = 0.0  # seconds spent in training steps, summed over resumes
        # With a time budget the cosine follows whichever is further along, steps or wall time, so a run on a
        # contended machine still ends its schedule (at the price of batch-exact reproducibility of the lr).
        self.time_budget_s: float | None = None
        self.history: list[dict] = []
        mc = cfg.model_config
        self.frame_tokens = (sim.SIZE // mc.patch_size[1]) * (sim.SIZE // mc.patch_size[2])
        self.meta = TeacherForcingMeta(self.frame_tokens, cfg.block_frames, cfg.clip_blocks, cfg.sink_blocks)
        self.rollouts = OwnRollouts(self.dit, cfg, self.rollout_backend, self.frame_tokens)

    def lr_at(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        p = min(1.0, (step - c.warmup) / max(1, c.steps - c.warmup))
        if self.time_budget_s:
            p = max(p, min(1.0, self.wall / self.time_budget_s))
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    def loss_on(self, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        c, dev = self.cfg, self.device
        if "context" in batch and batch["context"].shape[1] != batch["x0"].shape[1] - c.block_frames:
            raise ValueError(f"batch context must have {batch['x0'].shape[1] - c.block_frames} frames, "
                             f"got {batch['context'].shape[1]}")
        x0 = batch["x0"].to(dev)
        B, F_ = x0.shape[:2]
        nb, bf = c.clip_blocks, c.block_frames
        m = self.meta
        ft, nc = m.first_target, m.clean_blocks
        nt = nb - ft  # target blocks
        T0 = ft * bf  # first target frame
        # Per target block noise level: a share at sigma = 1 (first sampling step), the rest uniform.
        sig = torch.rand(B, nt, generator=g).clamp_min(0.02)
        sig = torch.where(torch.rand(B, nt, generator=g) < c.p_sigma_one, torch.ones_like(sig), sig)
        sig_f = sig.repeat_interleave(bf, dim=1).to(dev)  # [B, nt * bf]
        x_t = x0[:, T0:]
        noise = torch.randn(x_t.shape, generator=g).to(dev)
        s5 = sig_f[:, :, None, None, None]
        noised = (1 - s5) * x_t + s5 * noise
        clean = corrupt_context(x0, c, g)
        if "context" in batch:  # rollout batch: the model's own blocks as context (the last clean block is unused)
            clean = torch.cat([batch["context"].to(dev), x0[:, -bf:]], dim=1)
        clean = clean[:, :nc * bf]
        x_in = torch.cat([clean, noised], dim=1)  # [B, (nc + nt) * bf, 3, H, W]
        t_in = torch.cat([torch.full((B, nc * bf), c.context_timestep, device=dev), sig_f * 1000], dim=1)
        pos = torch.cat([torch.arange(nc * bf, device=dev), torch.arange(T0, F_, device=dev)])[None].expand(B, -1)
        acts = batch["actions"].to(dev)
        acts = torch.cat([acts[:, :nc * bf], acts[:, T0:]], dim=1)
        ctx = torch.cat([self.text.encode(p) for p in batch["prompts"]])  # [B, text_len, text_dim]
        pred = self.dit(x_in, t_in, ctx, frame_pos=pos, meta=m, backend=self.backend, actions=acts)
        pred = pred[:, nc * bf:]  # predictions for the noised copies, [B, nt * bf, 3, H, W]
        w_pix = 1 + c.dynamic_weight * batch["dynamic"][:, T0:].to(dev).float()  # [B, nt * bf, H, W]
        err = ((pred - x_t) ** 2).mean(2) * w_pix
        per_block = err.view(B, nt, bf, -1).mean((2, 3)) / w_pix.view(B, nt, bf, -1).mean((2, 3))  # [B, nt]
        bw = torch.ones(B, nt, device=dev)
        if ft == 0:
            bw[:, 0] = c.first_block_weight
        elif "gap" in batch:  # the first block after a gap sees only the sink: no loss
            bw[:, 0] = (batch["gap"].to(dev) == 0).float()
        loss = ((per_block * bw).sum(1) / bw.sum(1)).mean()
        with torch.no_grad():
            plain = ((pred - x_t) ** 2).mean((2, 3, 4)).view(B, nt, bf).mean(2)  # unweighted MSE [B, nt]
        return loss, {"mse_block": plain.mean(0).tolist()}

    def make_train_batch(self, step: int, g: torch.Generator, raw: dict | None = None) -> dict:
        """Batch ``step``; for rollout steps its context blocks are replaced by the model's own rollout.

        ``raw``: that step's simulator batch made ahead (``prefetch_job``, frames as uint8) instead of here."""
        c = self.cfg
        d = rollout_blocks_at(c, step)
        if raw is None:
            batch = make_batch(c, step, extra_blocks=d)
        else:
            if raw.get("step") != step:
                raise ValueError(f"prefetched batch is for step {raw.get('step')}, the trainer is at step {step}")
            batch = dict(raw)
            batch["x0"] = to_latent(torch.as_tensor(raw["x0"]).to(self.device))
        batch["rollout_blocks"] = d
        if d and c.sink_blocks:
            with torch.no_grad():
                text_ctx = torch.cat([self.text.encode(p) for p in batch["prompts"]])
            context, actions = self.rollouts.with_sink(batch["x0"].to(self.device),
                                                       batch["actions"].to(self.device), text_ctx, g)
            S, R = c.sink_blocks * c.block_frames, (c.clip_blocks - c.sink_blocks) * c.block_frames
            keep = torch.as_tensor(np.r_[0:S, batch["x0"].shape[1] - R:batch["x0"].shape[1]])
            batch = {"x0": batch["x0"][:, keep], "actions": actions.cpu(), "dynamic": batch["dynamic"][:, keep],
                     "prompts": batch["prompts"], "context": context, "gap": batch["gap"], "rollout_blocks": d}
        elif d:
            with torch.no_grad():
                text_ctx = torch.cat([self.text.encode(p) for p in batch["prompts"]])
            context = self.rollouts.plain(batch["x0"].to(self.device), batch["actions"].to(self.device),
                                          text_ctx, g)
            F_ = c.clip_blocks * c.block_frames
            batch = {"x0": batch["x0"][:, -F_:], "actions": batch["actions"][:, -F_:],
                     "dynamic": batch["dynamic"][:, -F_:], "prompts": batch["prompts"], "context": context,
                     "rollout_blocks": d}
        return batch

    def train_step(self, raw: dict | None = None) -> dict:
        c = self.cfg
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + self.step)
        batch = self.make_train_batch(self.step, g, raw)
        lr = self.lr_at(self.step)
        for grp in self.opt.param_groups:
            grp["lr"] = lr
        loss, info = self.loss_on(batch, g)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
        self.opt.step()
        d = min(c.ema, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - d)
        self.step += 1
        return {"loss": float(loss.detach()), "lr": lr, "grad_norm": float(gn), "rollout": batch["rollout_blocks"],
                **info}

    # ---- checkpoints ---------------------------------------------------------------------------
    def named(self, ema: bool) -> dict:
        src = self.ema if ema else [p.detach() for p in self.params]
        names = [f"dit.{n}" for n, _ in self.dit.named_parameters()] + \
                [f"text.{n}" for n, _ in self.text.named_parameters()]
        return {n: t.detach().cpu().contiguous() for n, t in zip(names, src)}

    def save(self, out: Path) -> None:
        from safetensors.torch import save_file
        out.mkdir(parents=True, exist_ok=True)
        tensors = self.named(False)
        tensors.update({f"ema.{k}": v for k, v in self.named(True).items()})
        save_file(tensors, str(out / "ckpt.safetensors.tmp"))
        torch.save(self.opt.state_dict(), out / "optim.pt.tmp")
        state = {"step": self.step, "wall_s": self.wall, "config": self.cfg.to_dict(), "history": self.history}
        (out / "state.json.tmp").write_text(json.dumps(state))
        for n in ("ckpt.safetensors", "optim.pt", "state.json"):  # renames last: a crash never leaves half a set
            os.replace(out / f"{n}.tmp", out / n)

    def load(self, ckpt: Path, optimizer: bool = True) -> None:
        """Continue from a checkpoint: weights, EMA, step, history and (``optimizer``) the optimizer state."""
        from safetensors.torch import load_file
        for n in ("ckpt.safetensors", "state.json") + (("optim.pt",) if optimizer else ()):
            if not (ckpt / n).exists():
                raise FileNotFoundError(f"checkpoint {ckpt} has no {n}")
        sd = load_file(str(ckpt / "ckpt.safetensors"))
        names = list(self.named(False))
        missing = [n for n in names if n not in sd or f"ema.{n}" not in sd]
        if missing:
            raise KeyError(f"checkpoint {ckpt} lacks tensors {missing[:5]}")
        with torch.no_grad():
            for n, p, e in zip(names, self.params, self.ema):
                if sd[n].shape != p.shape:
                    raise ValueError(f"checkpoint tensor {n} has shape {tuple(sd[n].shape)}, model {tuple(p.shape)}")
                p.copy_(sd[n])
                e.copy_(sd[f"ema.{n}"])
        if optimizer:
            self.opt.load_state_dict(torch.load(ckpt / "optim.pt", weights_only=True))
        state = json.loads((ckpt / "state.json").read_text())
        self.step, self.wall, self.history = int(state["step"]), float(state["wall_s"]), state["history"]

    def init_from(self, ckpt: Path) -> None:
        """Start a new run (step 0, fresh optimizer) from a checkpoint's EMA weights, e.g. to fine-tune.
        ``ckpt`` is a checkpoint directory, or an exported bundle's .json (its refiner, if any, is not trained
        here and is left out)."""
        from safetensors.torch import load_file
        if Path(ckpt).suffix == ".json":
            sd = {f"ema.{k}": v for k, v in bundle_tensors(Path(ckpt), self.text).items()}
        else:
            path = Path(ckpt) / "ckpt.safetensors"
            if not path.exists():
                raise FileNotFoundError(f"checkpoint {ckpt} has no ckpt.safetensors")
            sd = load_file(str(path))
        names = list(self.named(False))
        missing = [n for n in names if f"ema.{n}" not in sd]
        if missing:
            raise KeyError(f"checkpoint {ckpt} lacks EMA tensors {missing[:5]}")
        with torch.no_grad():
            for n, p, e in zip(names, self.params, self.ema):
                if sd[f"ema.{n}"].shape != p.shape:
                    raise ValueError(f"checkpoint tensor ema.{n} has shape {tuple(sd[f'ema.{n}'].shape)}, "
                                     f"model {tuple(p.shape)}")
                p.copy_(sd[f"ema.{n}"])
                e.copy_(sd[f"ema.{n}"])


def main(argv=None) -> int:
    """The command line (``train_cli.main``)."""
    from .train_cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
