"""Matrix-Game 2.0's action module: keyboard and mouse input into the hidden states of a DiT layer.

Each latent frame f reads the 12 pixel frames 4f-12 .. 4f-1 of the action sequences (earlier ones clamped to pixel
frame 0; ``action_windows``). The mouse branch runs temporal attention per spatial token over a cache of one key
per frame and token; the keyboard branch lets every token attend to one key per frame. Queries and keys go through
a weightless per-head RMSNorm and a 1-D RoPE on the absolute frame index (base 256, the first 8 channels), and
the keys into caches that live in the engine's page pool beside the self-attention K/V (``cache_groups``): one
entry per latent frame, evicted, forked and freed with it. Parameter names are the release's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigBase
from ...kernels.attention import BlockCausalMeta, DenseMeta, PagedMeta

__all__ = ["ActionConfig", "ActionModule", "FrameConditions", "action_windows", "action_rope"]


@dataclass
class ActionConfig(ConfigBase):
    """The release's ``action_config`` (same keys)."""
    blocks: list = field(default_factory=lambda: [0])
    enable_keyboard: bool = True
    enable_mouse: bool = True
    keyboard_dim_in: int = 4
    mouse_dim_in: int = 2
    hidden_size: int = 16  # keyboard embedding width per pixel frame
    keyboard_hidden_dim: int = 128  # heads_num * action head dim
    mouse_hidden_dim: int = 128
    heads_num: int = 2
    img_hidden_size: int = 64  # = the DiT's dim
    patch_size: list = field(default_factory=lambda: [1, 2, 2])
    qk_norm: bool = True
    qkv_bias: bool = False
    rope_dim_list: list = field(default_factory=lambda: [8, 28, 28])
    mouse_qk_dim_list: list = field(default_factory=lambda: [8, 28, 28])
    rope_theta: float = 256.0
    vae_time_compression_ratio: int = 4
    windows_size: int = 3

    def __post_init__(self):
        self.blocks = [int(b) for b in self.blocks]
        if not (self.enable_keyboard or self.enable_mouse):
            raise ValueError("action_config enables neither the keyboard nor the mouse")
        for name in ("keyboard_hidden_dim", "mouse_hidden_dim"):
            if getattr(self, name) % self.heads_num:
                raise ValueError(f"action_config {name} {getattr(self, name)} is not divisible by heads_num "
                                 f"{self.heads_num}")
        if self.enable_keyboard and self.enable_mouse and self.keyboard_hidden_dim != self.mouse_hidden_dim:
            raise ValueError("action_config keyboard_hidden_dim and mouse_hidden_dim must be equal")

    @property
    def head_dim(self) -> int:
        hidden = self.keyboard_hidden_dim if self.enable_keyboard else self.mouse_hidden_dim
        return hidden // self.heads_num

    @property
    def window(self) -> int:
        """Pixel frames of action input each latent frame reads."""
        return self.vae_time_compression_ratio * self.windows_size


def _rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-head RMSNorm without a gain, in float32 (the release's action-module norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def action_rope(x: torch.Tensor, frames: torch.Tensor, rope_dims: int, theta: float) -> torch.Tensor:
    """Rotate adjacent pairs of the first ``rope_dims`` channels of x [..., F, H, D] by frame index x
    theta^(-j/(rope_dims/2)) (in float32); ``frames`` [..., F] absolute latent frame indices broadcast over heads.
    The other channels are the release's row/column axes, always at position 0, so they stay as they are."""
    pairs = rope_dims // 2
    freqs = theta ** (-torch.arange(pairs, dtype=torch.float32, device=x.device) * 2 / rope_dims)
    ang = frames.to(torch.float32)[..., None] * freqs  # [..., F, pairs]
    cos, sin = torch.cos(ang)[..., None, :], torch.sin(ang)[..., None, :]  # [..., F, 1, pairs]
    head = x[..., :rope_dims].float().unflatten(-1, (pairs, 2))
    a, b = head[..., 0], head[..., 1]
    out = x.clone()
    out[..., :rope_dims] = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)
    return out


def action_windows(seq: torch.Tensor, frames, ratio: int = 4, window: int = 12) -> torch.Tensor:
    """Per latent frame f, the ``window`` pixel frames ratio*f - window .. ratio*f - 1 of a per-pixel-frame
    sequence [..., P, C] (indices below 0 read pixel frame 0) -> [..., len(frames), window, C]."""
    idx = torch.tensor([[max(0, ratio * int(f) - window + i) for i in range(window)] for f in frames],
                       dtype=torch.long, device=seq.device)
    if int(idx.max()) >= seq.shape[-2]:
        raise ValueError(f"latent frame {max(frames)} needs pixel frames up to {int(idx.max())}, the action "
                         f"sequence has {seq.shape[-2]}")
    return seq[..., idx, :]


@dataclass
class FrameConditions:
    """What a pass of a Matrix-Game model gets beside its noisy latents, per row and frame.

    concat [B, F, cond_channels, H, W]: mask + image latent of each frame; keyboard [B, F, W, K] and mouse
    [B, F, W, M]: each frame's window of per-pixel-frame actions (``action_windows``), None when the model (or
    the request) has no such input."""
    concat: torch.Tensor
    keyboard: torch.Tensor | None = None
    mouse: torch.Tensor | None = None

    @staticmethod
    def cat(items: list["FrameConditions"]) -> "FrameConditions":
        def c(name):
            vals = [getattr(it, name) for it in items]
            return None if vals[0] is None else torch.cat(vals)
        return FrameConditions(c("concat"), c("keyboard"), c("mouse"))


class _Gain(nn.Module):
    """A stored RMSNorm gain the release keeps but never applies (see the module docstring)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


def _attend(q, k, v, mask, exact: bool) -> torch.Tensor:
    """q [N, H, Lq, D], k/v [N, H, Lk, D], mask bool broadcastable to [N, H, Lq, Lk] or None."""
    if exact:
        s = torch.einsum("nhqd,nhkd->nhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return torch.einsum("nhqk,nhkd->nhqd", torch.softmax(s, dim=-1), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)


class ActionModule(nn.Module):
    """The release's action module of one layer: x -> x + mouse contribution + keyboard contribution."""

    def __init__(self, cfg: ActionConfig, dim: int, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H, D = cfg.heads_num, cfg.head_dim
        self.heads, self.head_dim = H, D
        if cfg.enable_mouse:
            self.mouse_mlp = nn.Sequential(nn.Linear(dim + cfg.window * cfg.mouse_dim_in, cfg.mouse_hidden_dim),
                                           nn.GELU(approximate="tanh"),
                                           nn.Linear(cfg.mouse_hidden_dim, cfg.mouse_hidden_dim),
                                           nn.LayerNorm(cfg.mouse_hidden_dim, eps=1e-5))
            self.t_qkv = nn.Linear(cfg.mouse_hidden_dim, 3 * H * D, bias=cfg.qkv_bias)
            self.proj_mouse = nn.Linear(H * D, dim, bias=cfg.qkv_bias)
            self.img_attn_q_norm, self.img_attn_k_norm = _Gain(D), _Gain(D)
        if cfg.enable_keyboard:
            self.keyboard_embed = nn.Sequential(nn.Linear(cfg.keyboard_dim_in, cfg.hidden_size), nn.SiLU(),
                                                nn.Linear(cfg.hidden_size, cfg.hidden_size))
            self.mouse_attn_q = nn.Linear(dim, H * D, bias=cfg.qkv_bias)
            self.keyboard_attn_kv = nn.Linear(cfg.window * cfg.hidden_size, 2 * H * D, bias=cfg.qkv_bias)
            self.proj_keyboard = nn.Linear(H * D, dim, bias=cfg.qkv_bias)
            self.key_attn_q_norm, self.key_attn_k_norm = _Gain(D), _Gain(D)

    def group_names(self) -> dict:
        L = self.layer
        out = {}
        if self.cfg.enable_mouse:
            out.update(mouse_k=f"action.{L}.mouse_k", mouse_v=f"action.{L}.mouse_v")
        if self.cfg.enable_keyboard:
            out.update(kbd_k=f"action.{L}.keyboard_k", kbd_v=f"action.{L}.keyboard_v")
        return out

    def cache_groups(self, page_tokens: int) -> dict:
        """Per-page entries: one mouse key/value per spatial token and one keyboard key/value per frame."""
        n = self.group_names()
        H, D = self.heads, self.head_dim
        out = {}
        if "mouse_k" in n:
            out[n["mouse_k"]] = out[n["mouse_v"]] = (page_tokens, H, D)
        if "kbd_k" in n:
            out[n["kbd_k"]] = out[n["kbd_v"]] = (1, H, D)
        return out

    def _rope(self, t, frames, dims: int):
        return action_rope(t, frames, dims, self.cfg.rope_theta)

    def forward(self, x, cond: FrameConditions, frame_pos: torch.Tensor, meta, frames: int, exact: bool):
        """x [B, F*T, dim] -> the same plus the mouse and keyboard contributions. frame_pos [B, F]: absolute
        latent frames. meta: PagedMeta (caches in its pool's groups), BlockCausalMeta or DenseMeta (whole clip)."""
        B, L, d = x.shape
        T = L // frames
        H, D = self.heads, self.head_dim
        names = self.group_names()
        if self.cfg.enable_mouse and cond.mouse is not None:
            win = cond.mouse.to(x.dtype).flatten(2)  # [B, F, W*M], oldest first
            inp = torch.cat([x.view(B, frames, T, d), win[:, :, None].expand(B, frames, T, win.shape[-1])], -1)
            qkv = self.t_qkv(self.mouse_mlp(inp)).view(B, frames, T, 3, H, D)
            fp = frame_pos[:, :, None].expand(B, frames, T)
            q = self._rope(_rms(qkv[..., 0, :, :]), fp, self.cfg.mouse_qk_dim_list[0])  # [B, F, T, H, D]
            k = self._rope(_rms(qkv[..., 1, :, :]), fp, self.cfg.mouse_qk_dim_list[0])
            v = qkv[..., 2, :, :]
            # temporal attention per spatial token: token t of frame f sees token t of every visible frame
            kc, vc, mask = self._with_context(k, v, names["mouse_k"], names["mouse_v"], meta, frames)
            qt = q.permute(0, 2, 3, 1, 4).reshape(B * T, H, frames, D)
            kt = kc.permute(0, 2, 3, 1, 4).reshape(B * T, H, kc.shape[1], D)
            vt = vc.permute(0, 2, 3, 1, 4).reshape(B * T, H, vc.shape[1], D)
            m = None if mask is None else mask.repeat_interleave(T, dim=0)[:, None]
            out = _attend(qt, kt, vt, m, exact).view(B, T, H, frames, D).permute(0, 3, 1, 2, 4)
            x = x + self.proj_mouse(out.reshape(B, L, H * D))
        if self.cfg.enable_keyboard:
            kb = cond.keyboard
            if kb is None:
                raise ValueError("this model's keyboard branch needs keyboard input")
            emb = self.keyboard_embed(kb.to(x.dtype)).flatten(2)  # [B, F, W*hidden]
            kv = self.keyboard_attn_kv(emb).view(B, frames, 1, 2, H, D)
            k = self._rope(_rms(kv[..., 0, :, :]), frame_pos[:, :, None], self.cfg.rope_dim_list[0])  # [B, F, 1, H, D]
            v = kv[..., 1, :, :]
            q = _rms(self.mouse_attn_q(x).view(B, frames, T, H, D))
            q = self._rope(q, frame_pos[:, :, None].expand(B, frames, T), self.cfg.rope_dim_list[0])
            kc, vc, mask = self._with_context(k, v, names["kbd_k"], names["kbd_v"], meta, frames)
            qk = q.reshape(B, L, H, D).transpose(1, 2)  # [B, H, L, D]
            kk = kc[:, :, 0].transpose(1, 2)  # [B, H, Lk, D]
            vk = vc[:, :, 0].transpose(1, 2)
            m = None
            if mask is not None:  # frame-level mask -> token-level queries
                m = mask.repeat_interleave(T, dim=1)[:, None]  # [B, 1, L, Lk]
            out = _attend(qk, kk, vk, m, exact).transpose(1, 2).reshape(B, L, H * D)
            x = x + self.proj_keyboard(out)
        return x

    @staticmethod
    def _with_context(k, v, kname, vname, meta, frames):
        """Keys/values of what the block sees, [B, Lk, T', H, D], and a bool frame mask [B, F, Lk] (None: all)."""
        if isinstance(meta, PagedMeta):
            pool = meta.pool.groups
            kp, vp = pool[kname], pool[vname]
            if meta.write_pages is not None:  # a commit / prefill pass stores the block's entries
                idx = meta.write_pages.reshape(-1).long()
                kp[idx] = k.reshape(-1, *k.shape[2:]).to(kp.dtype)
                vp[idx] = v.reshape(-1, *v.shape[2:]).to(vp.dtype)
            n = meta.context_pages_list
            maxp = max(n) if n else 0
            if maxp == 0:
                return k, v, None
            pages = meta.block_tables[:, :maxp].long()
            kc = torch.cat([kp[pages].to(k.dtype), k], dim=1)
            vc = torch.cat([vp[pages].to(v.dtype), v], dim=1)
            if min(n) == maxp:
                return kc, vc, None
            B = k.shape[0]
            masks = meta.__dict__.setdefault("_action_masks", {})  # one per pass, shared by its action layers
            seen = masks.get(frames)
            if seen is None:
                seen = torch.arange(maxp + frames, device=k.device)[None] < torch.tensor(n, device=k.device)[:, None]
                seen[:, maxp:] = True
                masks[frames] = seen
            return kc, vc, seen[:, None, :].expand(B, frames, maxp + frames)
        if isinstance(meta, BlockCausalMeta):
            return k, v, meta.frame_mask(frames, k.device)[None].expand(k.shape[0], frames, frames)
        if meta is None or isinstance(meta, DenseMeta):
            return k, v, None
        raise TypeError(f"unknown attention metadata {type(meta).__name__}")
