"""Helpers of the Matrix-Game tests: tiny variant models, random inputs, and a naive whole-clip rollout.

The naive rollout is the reference the engine is checked against: for every denoising step of every block it runs
the DiT once over the whole clip so far (the earlier blocks' clean latents at timestep 0, the current block's
input at its timestep) with a block-causal mask limited to the rolling window, no cache, no pages, and builds each
frame's action windows straight from the full per-pixel-frame sequences. With a block-causal mask a frame sees
exactly what it saw when its block was committed, so this equals the engine's cached, paged rollout.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from inferix.kernels.attention import BlockCausalMeta, ReferenceBackend
from inferix.models.matrixgame.bundle import VARIANTS
from inferix.models.matrixgame.dit import FrameConditions, MatrixGameConfig, MatrixGameDiT, action_windows
from inferix.models.schedule import add_noise, flow_to_x0, sigma_at, warped_timesteps


def tiny_config(variant: str = "universal", window: int | None = None) -> MatrixGameConfig:
    kb, mouse, win, _ = VARIANTS[variant]
    act = dict(blocks=[0], enable_keyboard=True, enable_mouse=mouse, keyboard_dim_in=kb, mouse_dim_in=2,
               hidden_size=16, keyboard_hidden_dim=128, mouse_hidden_dim=128, heads_num=2, img_hidden_size=64)
    return MatrixGameConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, image_dim=32, action=act,
                            local_attn_size=window or win, variant=variant)


def tiny_model(cfg: MatrixGameConfig, seed: int = 0) -> MatrixGameDiT:
    """Random weights with every parameter drawn (the release's init zeroes the output head and the action output
    projections, which would hide the action path)."""
    g = torch.Generator().manual_seed(seed)
    m = MatrixGameDiT(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("modulation"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m.eval()


def random_inputs(cfg: MatrixGameConfig, F: int, H: int, W: int, seed: int = 1, steps: int = 3, bf: int = 3) -> dict:
    """Inputs of the fixture schema (B, F, C, H, W latents; per-pixel-frame actions)."""
    g = torch.Generator().manual_seed(seed)
    P = 4 * (F - 1) + 1
    a = cfg.action_config
    mask = torch.zeros(1, F, 4, H, W)
    mask[:, 0] = 1
    out = {"visual_context": torch.randn(1, 17, cfg.image_dim, generator=g),
           "cond_concat": torch.cat([mask, torch.randn(1, F, 16, H, W, generator=g)], dim=2),
           "initial_noise": torch.randn(1, F, 16, H, W, generator=g),
           "keyboard_cond": (torch.rand(1, P, a.keyboard_dim_in, generator=g) > 0.6).float()}
    if a.enable_mouse:
        out["mouse_cond"] = 0.1 * torch.randn(1, P, 2, generator=g)
    for b in range(F // bf):
        for s in range(1, steps):
            out[f"renoise_b{b}_s{s}"] = torch.randn(1, bf, 16, H, W, generator=g)
    return out


def naive_rollout(dit: MatrixGameDiT, inputs: dict, steps: list, window: int, bf: int = 3, shift: float = 5.0):
    """(latents [1, F, C, H, W], {x0_b{b}_s{s}: [1, bf, C, H, W]}) by whole-clip recomputation (module docstring)."""
    ts = warped_timesteps([float(s) for s in steps], shift)
    sig = [sigma_at(t, shift) for t in ts]
    noise, cond = inputs["initial_noise"], inputs["cond_concat"]
    _, F, C, H, W = noise.shape
    a = dit.config.action_config
    kb, ms = inputs["keyboard_cond"][0], inputs.get("mouse_cond")
    tokens = (H // 2) * (W // 2)
    clean = torch.zeros(1, 0, C, H, W)
    x0s = {}
    for b in range(F // bf):
        n = (b + 1) * bf
        frames = list(range(n))
        fc = FrameConditions(concat=cond[:, :n], keyboard=action_windows(kb, frames, a.vae_time_compression_ratio,
                                                                         a.window)[None],
                             mouse=None if ms is None or not a.enable_mouse else
                             action_windows(ms[0], frames, a.vae_time_compression_ratio, a.window)[None])
        meta = BlockCausalMeta(frame_tokens=tokens, block_frames=bf, window_frames=window)
        x, x0 = noise[:, b * bf:n], None
        for s, t in enumerate(ts):
            if s:
                x = add_noise(x0, inputs[f"renoise_b{b}_s{s}"], sig[s])
            tt = torch.tensor([[0.0] * (n - bf) + [t] * bf])
            with torch.no_grad():
                v = dit(torch.cat([clean, x], dim=1), tt, inputs["visual_context"], meta=meta,
                        backend=ReferenceBackend(), actions=fc)[:, -bf:]
            x0 = flow_to_x0(x, v, torch.tensor(sig[s], dtype=torch.float64)).float()
            x0s[f"x0_b{b}_s{s}"] = x0
        clean = torch.cat([clean, x0], dim=1)
    return clean, x0s


def write_fixture(folder: Path, dit: MatrixGameDiT, inputs: dict, steps: list, window: int, bf: int = 3) -> Path:
    """A fixture folder of the matrix_game_tiny schema whose expected values come from ``naive_rollout``."""
    folder.mkdir(parents=True, exist_ok=True)
    latents, x0s = naive_rollout(dit, inputs, steps, window, bf)
    cfg = dit.config
    mk = {"model_type": "i2v", "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim,
          "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "in_dim": cfg.in_dim, "out_dim": cfg.out_dim,
          "eps": cfg.eps, "local_attn_size": window, "sink_size": 0, "text_len": 512, "action_config": cfg.action}
    F = inputs["initial_noise"].shape[1]
    loop = {"num_frames": F, "num_frame_per_block": bf, "denoising_step_list": list(steps),
            "warp_denoising_step": True, "timestep_shift": 5.0, "num_train_timesteps": 1000, "context_noise": 0,
            "local_attn_size_frames": window, "sink_size_frames": 0}
    (folder / "config.json").write_text(json.dumps({"model_kwargs": mk, "loop": loop,
                                                    "checks": {"recommended_atol": 1e-4}}))
    save_file({f"model.{k}": v.contiguous() for k, v in dit.state_dict().items()}, str(folder / "weights.safetensors"))
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(folder / "inputs.safetensors"))
    save_file({"latents": latents.contiguous(), **{k: v.contiguous() for k, v in x0s.items()}},
              str(folder / "expected.safetensors"))
    return folder
