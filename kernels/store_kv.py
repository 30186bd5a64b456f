"""Commit a block's K/V into the page pool.

A commit pass hands k/v [B, F*T, Hkv, D] of one block per row and ``write_pages`` [B, F], the physical
pages (one per latent frame) that receive them. The slot mapping is implicit: token i of row b goes to
page ``write_pages[b, i // T]``, slot ``i % T`` -- so the kernel needs no per-token slot tensor.

One program copies BLOCK_T tokens of one KV head of one row, K and V together, converting to the pool's
dtype on the way. Pages are addressed with int64 offsets (page * page_stride passes 2**31 with big pools).
``reference_store_kv`` (plain indexed assignment) lives in kernels/attention.py and is re-exported here.
"""
from __future__ import annotations

import torch

from ._triton_utils import LazyJIT, check_launchable, interpret_mode, next_pow2, tl
from .attention import reference_store_kv

__all__ = ["store_kv", "reference_store_kv"]


def _store_kv_kernel(
    K, V, KP, VP, WP,
    L, T, D,
    s_kb, s_kt, s_kh, s_kd,
    s_vb, s_vt, s_vh, s_vd,
    s_kpp, s_kpt, s_kph, s_kpd,
    s_vpp, s_vpt, s_vph, s_vpd,
    s_wb, s_wf,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = tok < L
    mask = t_ok[:, None] & (offs_d < D)[None, :]
    frame = tok // T
    page = tl.load(WP + b * s_wb + frame * s_wf, mask=t_ok, other=0).to(tl.int64)
    slot = (tok - frame * T).to(tl.int64)
    tok64 = tok.to(tl.int64)

    k = tl.load(K + b * s_kb + h * s_kh + tok64[:, None] * s_kt + offs_d[None, :] * s_kd, mask=mask)
    kp = KP + (page * s_kpp + slot * s_kpt + h * s_kph)[:, None] + offs_d[None, :] * s_kpd
    tl.store(kp, k.to(KP.dtype.element_ty), mask=mask)

    v = tl.load(V + b * s_vb + h * s_vh + tok64[:, None] * s_vt + offs_d[None, :] * s_vd, mask=mask)
    vp = VP + (page * s_vpp + slot * s_vpt + h * s_vph)[:, None] + offs_d[None, :] * s_vpd
    tl.store(vp, v.to(VP.dtype.element_ty), mask=mask)


_store_kv = LazyJIT(_store_kv_kernel)


def store_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             write_pages: torch.Tensor, *, validate: bool | None = None, block_t: int | None = None) -> None:
    """Write k/v [B, F*T, Hkv, D] of a block into pages write_pages [B, F] of the pools (in place).

    Same contract as ``reference_store_kv``. ``validate`` checks that page ids are in range and distinct
    (a host sync); default: only for CPU tensors.
    """
    what = "store_kv"
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"{what}: k and v must both be [B, F*T, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"{what}: pools must be [num_pages, page_tokens, Hkv, D] and equal, got "
                         f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}")
    B, L, H, D = k.shape
    num_pages, T = k_pool.shape[:2]
    if k_pool.shape[2:] != (H, D):
        raise ValueError(f"{what}: pool pages hold [{k_pool.shape[2]}, {k_pool.shape[3]}] heads x dim but k has "
                         f"[{H}, {D}]")
    if write_pages.dim() != 2 or write_pages.shape[0] != B or write_pages.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what}: write_pages must be int32 [B={B}, F], got {write_pages.dtype} "
                         f"{tuple(write_pages.shape)}")
    nF = write_pages.shape[1]
    if L != nF * T:
        raise ValueError(f"block has {L} tokens but write_pages names {nF} pages of {T} tokens")
    if validate is None:
        validate = k.device.type == "cpu"
    if validate and write_pages.numel():
        ids = write_pages.reshape(-1).long().cpu()
        if int(ids.min()) < 0 or int(ids.max()) >= num_pages:
            raise ValueError(f"{what}: write_pages {write_pages.tolist()} outside the pool of {num_pages} pages")
        if ids.unique().numel() != ids.numel():
            raise ValueError(f"{what}: write_pages {write_pages.tolist()} names a page twice")
    check_launchable(what, k_pool, v_pool, k, v, write_pages)
    if B == 0 or L == 0:
        return
    grid, args, kwargs = _launch_args(k_pool, v_pool, k, v, write_pages, block_t)
    _store_kv[grid](*args, **kwargs)


def _launch_args(k_pool, v_pool, k, v, write_pages, block_t=None, interpret=None):
    """Grid, positional and keyword arguments of one launch (also used for ahead-of-time compile checks)."""
    B, L, H, D = k.shape
    if block_t is None:
        block_t = 64 if (interpret_mode() if interpret is None else interpret) else 32
    grid = ((L + block_t - 1) // block_t, B, H)
    args = [k, v, k_pool, v_pool, write_pages, L, k_pool.shape[1], D,
            *k.stride(), *v.stride(), *k_pool.stride(), *v_pool.stride(),
            write_pages.stride(0), write_pages.stride(1)]
    return grid, args, dict(BLOCK_T=block_t, BLOCK_D=next_pow2(D), num_warps=4)
