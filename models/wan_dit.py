"""Causal Wan2.1 DiT: the denoiser of block-diffusion video models (Self-Forcing, CausVid, LongLive).

Parameter names follow the original Wan ``WanModel`` / Self-Forcing ``CausalWanModel`` state dict
(``blocks.0.self_attn.q.weight`` ...), so original checkpoints load without renaming.

The model holds no cache. Self-attention hands q/k/v to an attention backend together with metadata
that says which context the tokens see (dense clip, block-causal clip, or paged KV cache); see
kernels/attention.py. Every frame carries its own timestep (per-frame adaLN modulation) and its own RoPE
frame position, so rows of a batch may be different sessions at different points of their videos.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigBase
from ..kernels.attention import AttentionBackend, ReferenceBackend
from ..kernels.rope import apply_rope, apply_rope_qk, rope_angles, rope_cos_sin

__all__ = ["WanDiTConfig", "CausalWanDiT", "TextKV", "PRESETS", "sinusoidal_embedding", "per_frame", "patch_grid"]


@dataclass
class WanDiTConfig(ConfigBase):
    dim: int = 64
    ffn_dim: int = 128
    num_heads: int = 2
    num_layers: int = 2
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple = (1, 2, 2)
    freq_dim: int = 32
    text_dim: int = 32
    text_len: int = 16
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    num_actions: int = 0  # >0 adds a per-frame action embedding to the time embedding (world models)
    prediction: str = "flow"  # what the network outputs: "flow" (v = noise - x0) or "x0"
    rope_max_frames: int = 1024  # frame positions the checkpoint was trained with (Wan: 1024)

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.prediction not in ("flow", "x0"):
            raise ValueError(f"prediction must be 'flow' or 'x0', got {self.prediction!r}")
        for k in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "freq_dim", "text_dim", "text_len"):
            if int(getattr(self, k)) <= 0:
                raise ValueError(f"{k} must be positive, got {getattr(self, k)}")
        if self.patch_size[0] != 1:
            raise ValueError("only temporal patch size 1 is supported (one latent frame = one page)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


PRESETS = {
    "tiny": WanDiTConfig(),
    "wan2.1-t2v-1.3b": WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, freq_dim=256,
                                    text_dim=4096, text_len=512),
    "wan2.1-t2v-14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, freq_dim=256,
                                   text_dim=4096, text_len=512),
}


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] timesteps -> [N, dim] as [cos | sin], frequencies 10000^(-j/half), computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def patch_grid(cfg: WanDiTConfig, H: int, W: int) -> tuple[int, int]:
    """Patches per latent frame (rows, columns) of an H x W latent; ValueError when the patch does not divide it."""
    _, ph, pw = cfg.patch_size
    if H % ph or W % pw:
        raise ValueError(f"latent height/width {H}x{W} must be multiples of the patch {ph}x{pw}")
    return H // ph, W // pw


def per_frame(timestep, frame_pos, B: int, Fr: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A pass's timesteps (scalar, [B] or [B, F]) and RoPE frame positions ([B, F], default 0..F-1), both [B, F]."""
    timestep = torch.as_tensor(timestep, device=device)
    if timestep.dim() == 0:
        timestep = timestep.expand(B)
    if timestep.dim() == 1:
        timestep = timestep[:, None].expand(B, Fr)
    if frame_pos is None:
        frame_pos = torch.arange(Fr, device=device)[None].expand(B, Fr)
    return timestep, frame_pos


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SelfAttention(nn.Module):
    def __init__(self, cfg: WanDiTConfig, layer: int):
        super().__init__()
        d = cfg.dim
        self.layer, self.heads, self.head_dim = layer, cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = RMSNorm(d, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(d, cfg.eps) if cfg.qk_norm else nn.Identity()

    def project(self, x, cos, sin):
        """q, k (rotated), v and the keys before RoPE, each [B, L, H, D]."""
        B, L, _ = x.shape
        shape = (B, L, self.heads, self.head_dim)
        q = self.norm_q(self.q(x)).view(shape)  # [B, L, H, D]; RMSNorm over the full dim, then split
        k_raw = self.norm_k(self.k(x)).view(shape)
        v = self.v(x).view(shape)
        q, k = apply_rope_qk(q, k_raw, cos, sin)  # one fused launch on CUDA, the reference elsewhere
        return q, k, v, k_raw

    def project_kv(self, x, cos, sin):
        """Only the keys (rotated), values and keys before RoPE: what a cache write needs."""
        B, L, _ = x.shape
        shape = (B, L, self.heads, self.head_dim)
        k_raw = self.norm_k(self.k(x)).view(shape)
        return apply_rope(k_raw, cos, sin), self.v(x).view(shape), k_raw

    def forward(self, x, cos, sin, backend: AttentionBackend, meta):
        B, L, _ = x.shape
        q, k, v, k_raw = self.project(x, cos, sin)
        out = backend.attend(q, k, v, self.layer, meta, k_raw=k_raw)  # [B, L, H, D]
        return self.o(out.reshape(B, L, -1))

    def write_kv(self, x, cos, sin, backend: AttentionBackend, meta) -> None:
        """Only the cache write of ``forward``: the same keys and values, no queries and no attention."""
        k, v, k_raw = self.project_kv(x, cos, sin)
        backend.write_kv(k, v, self.layer, meta, k_raw=k_raw)


class CrossAttention(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        d = cfg.dim
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = RMSNorm(d, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(d, cfg.eps) if cfg.qk_norm else nn.Identity()

    def context_kv(self, ctx):  # ctx [B, Lt, dim] -> k, v [B, H, Lt, D]
        B, Lt, _ = ctx.shape
        k = self.norm_k(self.k(ctx)).view(B, Lt, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(ctx).view(B, Lt, self.heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x, kv):
        B, L, _ = x.shape
        q = self.norm_q(self.q(x)).view(B, L, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        k, v = kv
        attend = getattr(kv, "attend", None)  # sequence parallel: an all-to-all around it (inferix/parallel.py)
        if attend is not None:
            out = attend(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))  # every text token, no mask
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, cfg: WanDiTConfig, layer: int):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg, layer)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d ** 0.5)
        # the two fixed-shape halves around the paged attention; compile_blocks() swaps in compiled ones
        self.before_attention, self.before_cache_write, self.after_attention = self.qkv, self.kv, self.finish

    def _mod(self, t, shift, scale, frames):  # LayerNorm(x) * (1 + scale) + shift, per frame
        B, L, d = t.shape
        t = t.float().view(B, frames, L // frames, d)
        return (t * (1 + scale) + shift).view(B, L, d)

    def _gate(self, y, g, frames):
        B, L, d = y.shape
        return (y.float().view(B, frames, L // frames, d) * g).view(B, L, d)

    def _attn_input(self, x, e0, frames):
        e = (self.modulation[:, None].float() + e0.float()).chunk(6, dim=2)  # 6 x [B, F, 1, dim]
        return self._mod(self.norm1(x), e[0], e[1], frames).to(x.dtype)

    def qkv(self, x, e0, cos, sin, frames: int):
        """Everything before the self-attention: q, k, v, keys before RoPE ([B, L, H, D] each)."""
        return self.self_attn.project(self._attn_input(x, e0, frames), cos, sin)

    def kv(self, x, e0, cos, sin, frames: int):
        """Everything before a cache write: k, v, keys before RoPE."""
        return self.self_attn.project_kv(self._attn_input(x, e0, frames), cos, sin)

    def finish(self, x, attn, e0, ctx_kv, frames: int):
        """Everything after the self-attention (attn [B, L, H, D]): output projection, gate, cross-attention, FFN."""
        B, L, d = x.shape
        e = (self.modulation[:, None].float() + e0.float()).chunk(6, dim=2)
        y = self.self_attn.o(attn.reshape(B, L, -1))
        x = (x.float() + self._gate(y, e[2], frames)).to(x.dtype)
        x = x + self.cross_attn(self.norm3(x), ctx_kv)
        y = self.ffn(self._mod(self.norm2(x), e[3], e[4], frames).to(x.dtype))
        return (x.float() + self._gate(y, e[5], frames)).to(x.dtype)

    def forward(self, x, e0, ctx_kv, cos, sin, backend, meta, frames: int, kv_only: bool = False):
        # x [B, F*T, dim]; e0 [B, F, 6, dim] per-frame modulation -> broadcast over the T tokens of a frame.
        # kv_only: write this layer's K/V to the cache and return None (nothing after the write is computed)
        attn = self.self_attn
        if kv_only:  # a commit pass's last layer: its K/V are all that is kept
            k, v, k_raw = self.before_cache_write(x, e0, cos, sin, frames)
            backend.write_kv(k, v, attn.layer, meta, k_raw=k_raw)
            return None
        q, k, v, k_raw = self.before_attention(x, e0, cos, sin, frames)
        out = backend.attend(q, k, v, attn.layer, meta, k_raw=k_raw)  # [B, L, H, D]
        return self.after_attention(x, out, e0, ctx_kv, frames)


class Head(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(d, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, d) / d ** 0.5)

    def forward(self, x, e, frames):  # e [B, F, dim]
        B, L, d = x.shape
        shift, scale = (self.modulation[:, None].float() + e[:, :, None].float()).chunk(2, dim=2)  # [B,F,1,d]
        y = self.norm(x).float().view(B, frames, L // frames, d) * (1 + scale) + shift
        return self.head(y.view(B, L, d).to(x.dtype))


@dataclass
class TextKV:
    """Cross-attention K/V of a prompt for every layer, computed once per prompt and reused."""
    kv: list  # per layer (k, v), each [B, H, Lt, D]

    @staticmethod
    def cat(items: list["TextKV"]) -> "TextKV":
        return TextKV([(torch.cat([it.kv[i][0] for it in items]), torch.cat([it.kv[i][1] for it in items]))
                       for i in range(len(items[0].kv))])


class CausalWanDiT(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.config = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        if cfg.num_actions:
            self.action_embedding = nn.Embedding(cfg.num_actions, d)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_layers)])
        self.head = Head(cfg)

    # ---- conditioning -------------------------------------------------------------------------
    def prepare_text(self, text_embeds: torch.Tensor) -> TextKV:
        """text_embeds [B, Lt, text_dim] (Lt <= text_len, zero-padded here) -> per-layer cross K/V."""
        cfg = self.config
        if text_embeds.dim() != 3 or text_embeds.shape[-1] != cfg.text_dim:
            raise ValueError(f"text embeddings must be [B, L, {cfg.text_dim}], got {tuple(text_embeds.shape)}")
        B, Lt, _ = text_embeds.shape
        if Lt > cfg.text_len:
            raise ValueError(f"text has {Lt} tokens, the model takes at most text_len={cfg.text_len}")
        if Lt < cfg.text_len:
            pad = text_embeds.new_zeros(B, cfg.text_len - Lt, cfg.text_dim)
            text_embeds = torch.cat([text_embeds, pad], dim=1)
        p = next(self.parameters())
        ctx = self.text_embedding(text_embeds.to(device=p.device, dtype=p.dtype))
        return TextKV([blk.cross_attn.context_kv(ctx) for blk in self.blocks])

    def time_embed(self, timestep: torch.Tensor, actions: torch.Tensor | None):
        """timestep [B, F] -> e [B, F, dim], e0 [B, F, 6, dim]."""
        B, Fr = timestep.shape
        p = next(self.parameters())
        emb = sinusoidal_embedding(timestep.reshape(-1), self.config.freq_dim)
        e = self.time_embedding(emb.to(p.dtype)).view(B, Fr, -1)
        if self.config.num_actions:
            if actions is None:
                actions = torch.zeros(B, Fr, dtype=torch.long, device=e.device)
            if actions.shape != (B, Fr):
                raise ValueError(f"actions must be [B, F] = {(B, Fr)}, got {tuple(actions.shape)}")
            capturing = actions.is_cuda and torch.cuda.is_current_stream_capturing()  # no host sync in a graph
            if not capturing and (int(actions.min()) < 0 or int(actions.max()) >= self.config.num_actions):
                raise ValueError(f"action ids must be in [0, {self.config.num_actions}), got {actions.tolist()}")
            e = e + self.action_embedding(actions.to(e.device))
        e0 = self.time_projection(e).view(B, Fr, 6, -1)
        return e, e0

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context, *, frame_pos: torch.Tensor | None = None,
                meta=None, backend: AttentionBackend | None = None, actions: torch.Tensor | None = None,
                rope: tuple | None = None, kv_only: bool = False) -> torch.Tensor | None:
        """Predict for latents x [B, F, C, H, W] at per-frame timesteps [B, F] (or [B] / scalar).

        context: TextKV from ``prepare_text`` or raw text embeddings [B, Lt, text_dim].
        frame_pos: [B, F] RoPE frame positions of the frames (default 0..F-1).
        rope: precomputed (cos, sin) for these positions (see ``rope_for``), to skip recomputing them.
        meta/backend: attention metadata and backend (default: dense clip, reference backend).
        kv_only: a commit pass, whose prediction nobody reads: every layer's K/V are written through
        ``backend.write_kv`` exactly as a full pass writes them, the last layer stops after its write (no
        attention, cross-attention, FFN or head) and None is returned.
        Returns the prediction [B, F, out_dim, H, W] (flow or x0, see config.prediction), float32.
        """
        cfg = self.config
        if x.dim() != 5 or x.shape[2] != cfg.in_dim:
            raise ValueError(f"latents must be [B, F, {cfg.in_dim}, H, W], got {tuple(x.shape)}")
        B, Fr, C, H, W = x.shape
        h, w = patch_grid(cfg, H, W)
        _, ph, pw = cfg.patch_size
        timestep, frame_pos = per_frame(timestep, frame_pos, B, Fr, x.device)
        backend = backend or ReferenceBackend()
        if not isinstance(context, TextKV):
            context = self.prepare_text(context)
        p = next(self.parameters())

        tokens = self.patch_embedding(x.to(p.dtype).permute(0, 2, 1, 3, 4))  # [B, dim, F, h, w]
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, F*h*w, dim], frame-major then row then column
        cos, sin = rope if rope is not None else self.rope_for(frame_pos.to(x.device), h, w)
        e, e0 = self.time_embed(timestep, actions)
        sp = getattr(backend, "sequence_parallel", None)  # Ulysses: this rank keeps a slice of each frame's tokens
        if sp is not None:
            tokens, cos, sin, context = sp.split(tokens, cos, sin, Fr, context)
        last = len(self.blocks) - 1
        for i, (blk, kv) in enumerate(zip(self.blocks, context.kv)):
            tokens = blk(tokens, e0, kv, cos, sin, backend, meta, Fr, kv_only=kv_only and i == last)
        if kv_only:
            return None
        out = self.head(tokens, e, Fr)  # [B, F*h*w, ph*pw*C_out]
        if sp is not None:  # every rank gets every token's prediction
            out = sp.gather(out)
        out = out.float().view(B, Fr, h, w, ph, pw, cfg.out_dim)
        return out.permute(0, 1, 6, 2, 4, 3, 5).reshape(B, Fr, cfg.out_dim, H, W)

    def compile_blocks(self, mode: str | None = "default") -> None:
        """torch.compile the fixed-shape halves of every block (everything but the paged attention, whose context
        grows and rolls), without dynamic shapes: a pass of the same batch and block size reuses its graphs, and
        the blocks share them. mode: a torch.compile mode ("default", "reduce-overhead", "max-autotune",
        "max-autotune-no-cudagraphs"), or None to go back to eager."""
        for blk in self.blocks:
            if mode is None:
                blk.before_attention, blk.before_cache_write, blk.after_attention = blk.qkv, blk.kv, blk.finish
                continue
            opts = dict(mode=None if mode == "default" else mode, dynamic=False)
            blk.before_attention = torch.compile(blk.qkv, **opts)
            blk.before_cache_write = torch.compile(blk.kv, **opts)
            blk.after_attention = torch.compile(blk.finish, **opts)

    def rope_for(self, frame_pos: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, F*h*w, head_dim/2] for frame positions [B, F] on an h x w patch grid."""
        return rope_cos_sin(rope_angles(frame_pos, h, w, self.config.head_dim))

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        _, ph, pw = self.config.patch_size
        return (latent_h // ph) * (latent_w // pw)
