"""Decoding for pixel-space models: the identity codec and the small learned refiner that may follow it.

A pixel-space denoiser's clean estimate already is the frame (latent = pixel / 127.5 - 1). A few-step x0 estimate
is the mean of what the model thinks may come, so whatever moves is soft at its edges. ``PixelRefiner`` is a
per-frame residual conv net trained on (the model's estimate, the true frame) pairs: it renders the estimate as a
crisp frame. It works frame by frame, so decoding stays stateless and streams block by block; the KV cache keeps
the denoiser's own estimate (the latent), never the refined frame.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PixelDecoder", "PixelRefiner"]


class PixelRefiner(nn.Module):
    """out = x + f(x) for frames x [N, 3, H, W] in [-1, 1]; f: ``layers`` 3x3 convs, ``channels`` wide, residual
    in the middle. The last conv starts at zero, so an untrained refiner is the identity."""

    def __init__(self, channels: int = 24, layers: int = 4):
        super().__init__()
        if channels < 1 or layers < 2:
            raise ValueError(f"a refiner needs channels >= 1 and layers >= 2, got channels={channels} layers={layers}")
        self.channels, self.layers = int(channels), int(layers)
        self.inp = nn.Conv2d(3, channels, 3, padding=1)
        self.mid = nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1) for _ in range(layers - 2)])
        self.out = nn.Conv2d(channels, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def config(self) -> dict:
        return {"channels": self.channels, "layers": self.layers}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"the refiner takes frames [N, 3, H, W], got {tuple(x.shape)}")
        h = F.gelu(self.inp(x))
        for conv in self.mid:
            h = h + F.gelu(conv(h))
        return x + self.out(h)


class PixelDecoder:
    """Identity "VAE" for pixel-space models: latent = pixel / 127.5 - 1, one latent frame per pixel frame; with a
    ``refiner``, decoded frames are ``refiner(latent)`` (encoding stays the identity)."""
    temporal_ratio = 1
    spatial_ratio = 1

    def __init__(self, channels: int = 3, refiner: PixelRefiner | None = None):
        if refiner is not None and channels != 3:
            raise ValueError(f"a pixel refiner works on RGB latents (3 channels), the model has {channels}")
        self.latent_channels = channels
        self.refiner = refiner.eval() if refiner is not None else None

    def to(self, device=None, dtype=None):
        if self.refiner is not None:
            self.refiner.to(device=device)
        return self

    def pixel_frames(self, n_latent: int) -> int:
        return n_latent

    def latent_frames(self, n_pixel: int) -> int:
        return n_pixel

    def new_stream(self):
        return None

    @torch.no_grad()
    def refine(self, latents: torch.Tensor) -> torch.Tensor:
        """[..., 3, H, W] latents -> the refined latents (unchanged without a refiner), clamped to [-1, 1]."""
        x = latents.float().clamp(-1, 1)
        if self.refiner is None:
            return x
        shape = x.shape
        w = next(self.refiner.parameters())
        y = self.refiner(x.reshape(-1, *shape[-3:]).to(w.device, w.dtype))
        return y.float().reshape(shape).to(x.device).clamp(-1, 1)

    def decode_block(self, state, latents: torch.Tensor) -> np.ndarray:
        x = self.refine(latents[0])  # [F, 3, H, W]
        return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def encode(self, frames) -> torch.Tensor:
        f = torch.as_tensor(np.asarray(frames))
        if f.dim() != 4 or f.shape[-1] != 3 or f.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {f.dtype} {tuple(f.shape)}")
        return (f.permute(0, 3, 1, 2).float() / 127.5 - 1)[None]  # [1, T, 3, H, W]
