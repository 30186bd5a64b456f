"""Decoding for pixel-space models: the identity codec and the small learned refiner that may follow it.

A pixel-space denoiser's clean estimate already is the frame (latent = pixel / 127.5 - 1). A few-step x0 estimate
is the mean of what the model thinks may come, so whatever moves is soft at its edges. ``PixelRefiner`` is a
per-frame residual conv net trained on (the model's estimate, the true frame) pairs: it renders the estimate as a
crisp frame. The KV cache keeps the denoiser's own estimate (the latent), never the refined frame.

A refiner with ``reference_frames=K`` also sees a reference image: the per-pixel median of the stream's first K
latent frames (given start frames or generated ones). That is where the scene stood at the start, with whatever
moved through it mostly gone, so the refiner can take a static part of the scene from it where the estimate is
unsure. The decoder's stream state keeps those first K frames; before there are K, the median is over the frames
so far, the block being decoded included. Without a reference the refiner works frame by frame and the stream has
no state.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PixelDecoder", "PixelRefiner", "ReferenceStream", "reference_image"]


def reference_image(frames: torch.Tensor) -> torch.Tensor:
    """The reference a refiner is given: the per-pixel, per-channel (lower) median of latent frames [K, 3, H, W]."""
    if frames.dim() != 4 or frames.shape[0] < 1:
        raise ValueError(f"a reference is made from frames [K >= 1, C, H, W], got {tuple(frames.shape)}")
    return frames.median(dim=0).values


class PixelRefiner(nn.Module):
    """out = x + f(x, ref) for frames x [N, 3, H, W] in [-1, 1]; f: ``layers`` 3x3 convs, ``channels`` wide,
    residual in the middle. The last conv starts at zero, so an untrained refiner is the identity.

    ``reference_frames`` > 0: f also reads a reference image ref [N, 3, H, W] (``reference_image`` of the stream's
    first ``reference_frames`` frames), stacked with x as 6 input channels."""

    def __init__(self, channels: int = 24, layers: int = 4, reference_frames: int = 0):
        super().__init__()
        if channels < 1 or layers < 2:
            raise ValueError(f"a refiner needs channels >= 1 and layers >= 2, got channels={channels} layers={layers}")
        if reference_frames < 0:
            raise ValueError(f"reference_frames must be >= 0, got {reference_frames}")
        self.channels, self.layers, self.reference_frames = int(channels), int(layers), int(reference_frames)
        self.inp = nn.Conv2d(6 if reference_frames else 3, channels, 3, padding=1)
        self.mid = nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1) for _ in range(layers - 2)])
        self.out = nn.Conv2d(channels, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def config(self) -> dict:
        c = {"channels": self.channels, "layers": self.layers}
        if self.reference_frames:
            c["reference_frames"] = self.reference_frames
        return c

    def forward(self, x: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"the refiner takes frames [N, 3, H, W], got {tuple(x.shape)}")
        if self.reference_frames:
            if ref is None or ref.shape != x.shape:
                got = None if ref is None else tuple(ref.shape)
                raise ValueError(f"this refiner needs a reference image per frame, [N, 3, H, W] = {tuple(x.shape)}, "
                                 f"got {got}")
            x_in = torch.cat([x, ref], dim=1)
        elif ref is not None:
            raise ValueError("this refiner takes no reference image (reference_frames is 0)")
        else:
            x_in = x
        h = F.gelu(self.inp(x_in))
        for conv in self.mid:
            h = h + F.gelu(conv(h))
        return x + self.out(h)


class ReferenceStream:
    """A stream's state for a refiner with a reference: its first ``k`` latent frames [<= k, 3, H, W]."""

    def __init__(self, k: int):
        self.k = int(k)
        self.frames: torch.Tensor | None = None
        self._ref: torch.Tensor | None = None  # the median, kept once all k frames are in

    def reference(self, latents: torch.Tensor) -> torch.Tensor:
        """Take in the frames [F, 3, H, W] about to be decoded (the first k of the stream are kept, clamped to
        [-1, 1]) and return the reference image [3, H, W] for them."""
        if self._ref is not None:
            return self._ref
        x = latents.detach().float().clamp(-1, 1)
        if self.frames is None:
            self.frames = x[: self.k].clone()
        else:
            self.frames = torch.cat([self.frames, x[: self.k - len(self.frames)].to(self.frames.device)])
        ref = reference_image(self.frames)
        if len(self.frames) == self.k:
            self._ref = ref
        return ref


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

    @property
    def reference_frames(self) -> int:
        return self.refiner.reference_frames if self.refiner is not None else 0

    def new_stream(self):
        return ReferenceStream(self.reference_frames) if self.reference_frames else None

    @torch.no_grad()
    def refine(self, latents: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        """[..., 3, H, W] latents -> the refined latents (unchanged without a refiner), clamped to [-1, 1].
        ``ref`` [3, H, W]: the reference image, needed by a refiner with ``reference_frames``."""
        x = latents.float().clamp(-1, 1)
        if self.refiner is None:
            return x
        shape = x.shape
        w = next(self.refiner.parameters())
        flat = x.reshape(-1, *shape[-3:]).to(w.device, w.dtype)
        r = None if ref is None else ref.float().clamp(-1, 1).to(w.device, w.dtype).expand_as(flat)
        y = self.refiner(flat, r)
        return y.float().reshape(shape).to(x.device).clamp(-1, 1)

    def refine_stream(self, state, latents: torch.Tensor) -> torch.Tensor:
        """Refine the next frames [F, 3, H, W] of a stream (``state`` from ``new_stream``), updating its state."""
        if not self.reference_frames:
            return self.refine(latents)
        if not isinstance(state, ReferenceStream):
            raise TypeError(f"this refiner needs the stream state from new_stream(), got {type(state).__name__}")
        return self.refine(latents, state.reference(latents))

    def decode_block(self, state, latents: torch.Tensor) -> np.ndarray:
        x = self.refine_stream(state, latents[0])  # [F, 3, H, W]
        return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def encode(self, frames) -> torch.Tensor:
        f = torch.as_tensor(np.asarray(frames))
        if f.dim() != 4 or f.shape[-1] != 3 or f.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {f.dtype} {tuple(f.shape)}")
        return (f.permute(0, 3, 1, 2).float() / 127.5 - 1)[None]  # [1, T, 3, H, W]
