"""3-D rotary position embedding (frame, row, column) on adjacent element pairs.

Head dim D is D/2 complex pairs made of adjacent elements (0,1), (2,3), ...; the pairs are split between
the frame, row and column axes as (D/2 - 2*(D//6), D//6, D//6) pairs (6/5/5 for D = 32, 22/21/21 for D = 128),
see `rope_split`. Angles are position x 10000^(-j/n) with n the pair count of that axis.

This file holds the torch reference (`reference_apply_rope`), a faster torch version of it that multiplies complex
pairs (`torch_apply_rope`, used off CUDA), the angle builder and a Triton kernel with the same signature
(`triton_apply_rope`; `apply_rope` dispatches to it for CUDA tensors). The kernel can
rotate Q and K in one launch (`apply_rope_qk`): each program loads the cos/sin of its tokens once and
rotates every head of both. Arithmetic runs in cos/sin's dtype, as in the reference.
"""
from __future__ import annotations

import torch

from ._triton_utils import LazyJIT, check_launchable, interpret_mode, next_pow2, tl

__all__ = ["rope_split", "rope_angles", "rope_cos_sin", "reference_apply_rope", "torch_apply_rope", "apply_rope",
           "apply_rope_qk", "triton_apply_rope"]


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


def _rope_kernel(
    X, Y, XO, YO, COS, SIN,
    L, HX, HY, D2,
    s_xb, s_xt, s_xh, s_xd,
    s_yb, s_yt, s_yh, s_yd,
    s_ob, s_ot, s_oh, s_od,
    s_pb, s_pt, s_ph, s_pd,
    s_cb, s_ct, s_cd,
    HAS_Y: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tok = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    j = tl.arange(0, BLOCK_D2)
    mask = (tok < L)[:, None] & (j < D2)[None, :]
    cs_off = b * s_cb + tok[:, None] * s_ct + j[None, :] * s_cd  # [BT, BD2]
    c = tl.load(COS + cs_off, mask=mask, other=0.0)
    s = tl.load(SIN + cs_off, mask=mask, other=0.0)
    x_even = tok[:, None] * s_xt + (2 * j)[None, :] * s_xd
    o_even = tok[:, None] * s_ot + (2 * j)[None, :] * s_od
    for h in range(HX):
        xp = X + b * s_xb + h * s_xh + x_even
        # via fp32: exact for 16-bit inputs, and the interpreter cannot convert bf16 <-> fp64 directly
        x0 = tl.load(xp, mask=mask, other=0.0).to(tl.float32).to(c.dtype)
        x1 = tl.load(xp + s_xd, mask=mask, other=0.0).to(tl.float32).to(c.dtype)
        op = XO + b * s_ob + h * s_oh + o_even
        tl.store(op, (x0 * c - x1 * s).to(tl.float32).to(XO.dtype.element_ty), mask=mask)
        tl.store(op + s_od, (x0 * s + x1 * c).to(tl.float32).to(XO.dtype.element_ty), mask=mask)
    if HAS_Y:
        y_even = tok[:, None] * s_yt + (2 * j)[None, :] * s_yd
        p_even = tok[:, None] * s_pt + (2 * j)[None, :] * s_pd
        for h in range(HY):
            yp = Y + b * s_yb + h * s_yh + y_even
            y0 = tl.load(yp, mask=mask, other=0.0).to(tl.float32).to(c.dtype)
            y1 = tl.load(yp + s_yd, mask=mask, other=0.0).to(tl.float32).to(c.dtype)
            pp = YO + b * s_pb + h * s_ph + p_even
            tl.store(pp, (y0 * c - y1 * s).to(tl.float32).to(YO.dtype.element_ty), mask=mask)
            tl.store(pp + s_pd, (y0 * s + y1 * c).to(tl.float32).to(YO.dtype.element_ty), mask=mask)


_rope = LazyJIT(_rope_kernel)


def _check_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, L, H, D], got shape {tuple(x.shape)}")
    B, L, H, D = x.shape
    if D % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {D}")
    if cos.shape != (B, L, D // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [B, L, D/2] = {(B, L, D // 2)}, got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got {x.dtype}")


def _launch_args(x, y, cos, sin, block_t=None, interpret=None):
    """Outputs, grid, positional and keyword arguments of one launch (also used for ahead-of-time
    compile checks). y (the keys) is optional: without it the kernel rotates x only."""
    B, L, H, D = x.shape
    if cos.dtype != sin.dtype:
        sin = sin.to(cos.dtype)
    xo = torch.empty_like(x)
    yo = torch.empty_like(y) if y is not None else xo
    if block_t is None:  # the interpreter pays per program, the GPU wants many small programs
        block_t = 64 if (interpret_mode() if interpret is None else interpret) else 16
    yy = y if y is not None else x
    grid = ((L + block_t - 1) // block_t, B)
    args = [x, yy, xo, yo, cos, sin, L, H, yy.shape[2], D // 2,
            *x.stride(), *yy.stride(), *xo.stride(), *yo.stride(), *cos.stride()]
    kwargs = dict(HAS_Y=y is not None, BLOCK_T=block_t, BLOCK_D2=next_pow2(D // 2), num_warps=4)
    return (xo, yo if y is not None else None), grid, args, kwargs


def _launch_rope(x, y, cos, sin, block_t):
    outs, grid, args, kwargs = _launch_args(x, y, cos, sin, block_t)
    if x.shape[0] and x.shape[1]:
        _rope[grid](*args, **kwargs)
    return outs


def triton_apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                      block_t: int | None = None) -> torch.Tensor:
    """Triton kernel with the contract of ``reference_apply_rope``: x [B, L, H, D], cos/sin [B, L, D/2]."""
    _check_rope(x, cos, sin, "x")
    check_launchable("triton_apply_rope", x, cos, sin)
    return _launch_rope(x, None, cos, sin, block_t)[0]


def torch_apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``reference_apply_rope`` as one complex multiply per pair (x0 + i x1)(cos + i sin): the same arithmetic in
    cos's dtype, without the reference's separate products and stack (several times faster on the CPU). Half
    precision angles, which have no complex type here, go to the reference."""
    if cos.dtype not in (torch.float32, torch.float64):
        return reference_apply_rope(x, cos, sin)
    B, L, H, D = x.shape
    if cos.shape != (B, L, D // 2):
        raise ValueError(f"cos/sin must be [B, L, D/2] = {(B, L, D // 2)}, got {tuple(cos.shape)}")
    xr = x.to(cos.dtype).contiguous()
    if xr.storage_offset() % 2:  # a complex view needs pairs that start on an even element
        xr = xr.clone()
    out = rotate_pairs(xr, rope_table(cos, sin))
    return torch.view_as_real(out).view(B, L, H, D).to(x.dtype)


def rope_table(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """cos + i sin, [B, L, D/2] complex in cos's precision (float32 or float64 angles)."""
    return torch.complex(cos, sin.to(cos.dtype))


def rotate_pairs(x: torch.Tensor, table: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, L, H, D] (pairs adjacent, contiguous in D) times ``rope_table`` [B, L, D/2]: the complex product
    [B, L, H, D/2]. With ``out`` (a real [B, L, H, D] view, e.g. a slice of a larger buffer) it is written there
    in out's dtype instead."""
    B, L, H, D = x.shape
    xc = torch.view_as_complex(x.view(B, L, H, D // 2, 2))
    if out is None:
        return xc * table[:, :, None, :]
    return torch.mul(xc, table[:, :, None, :], out=torch.view_as_complex(out.view(B, L, H, D // 2, 2)))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Dispatch: the Triton kernel for CUDA tensors, ``torch_apply_rope`` elsewhere."""
    if x.is_cuda and cos.is_cuda:
        return triton_apply_rope(x, cos, sin)
    return torch_apply_rope(x, cos, sin)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, L, H, D] and k [B, L, Hkv, D] with the same angles; one launch on CUDA."""
    _check_rope(q, cos, sin, "q")
    _check_rope(k, cos, sin, "k")
    if q.is_cuda and k.is_cuda and cos.is_cuda:
        check_launchable("apply_rope_qk", q, k, cos, sin)
        return _launch_rope(q, k, cos, sin, None)
    return torch_apply_rope(q, cos, sin), torch_apply_rope(k, cos, sin)
