"""Matrix-Game 2.0's denoiser: a causal Wan DiT conditioned on a start image and on keyboard and mouse input.

What differs from the text-to-video Wan DiT (models/wan_dit.py), all of it following the public Matrix-Game 2.0
release (its ``CausalWanModel`` with ``model_type="i2v"`` and an ``action_config``):

- **Input**: each pass feeds [noisy latents (16), mask (4), image latent (16)] = 36 channels to the patch
  embedding. The mask is 1 on latent frame 0 and 0 elsewhere; the image latent is the VAE latent of the start
  image followed by zero frames. Both arrive per frame in ``FrameConditions.concat``.
- **Cross-attention context**: the CLIP image tokens through ``img_emb`` (LayerNorm, Linear, exact GELU, Linear,
  LayerNorm; eps 1e-5), the only context: there is no text branch. ``prepare_text`` takes those tokens.
- **Action module** in some layers, between cross-attention and the FFN (``ActionModule``,
  models/matrixgame/action.py): keyboard and mouse input, each latent frame reading a window of the pixel frames'
  actions, with its own caches in the engine's page pool beside the self-attention K/V (``cache_groups``).

Parameter names are the release's (without its ``model.`` prefix). The four action-module RMSNorm gains of the
release are parameters that nothing reads (the release normalises without them); they load and are kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import check_kind
from ..wan_dit import Block, CausalWanDiT, Head, TextKV, WanDiTConfig, patch_grid, per_frame
from ...kernels.attention import ReferenceBackend
from .action import ActionConfig, ActionModule, FrameConditions, action_rope, action_windows

__all__ = ["ActionConfig", "MatrixGameConfig", "MatrixGameDiT", "FrameConditions", "action_windows",
           "action_rope"]


@dataclass
class MatrixGameConfig(WanDiTConfig):
    """A Wan DiT config plus the image and action conditioning. ``in_dim`` = latent channels (``out_dim``) +
    ``cond_channels`` (mask 4 + image latent 16)."""
    in_dim: int = 36
    image_dim: int = 32  # width of the image tokens (CLIP ViT-H/14: 1280)
    cond_channels: int = 20
    action: dict | None = None  # ActionConfig fields (None: no action module)
    local_attn_size: int = 6  # the release's window (latent frames), incl. the current block
    sink_size: int = 0
    variant: str = ""

    def __post_init__(self):
        super().__post_init__()
        if self.in_dim != self.out_dim + self.cond_channels:
            raise ValueError(f"in_dim {self.in_dim} must be out_dim {self.out_dim} + cond_channels "
                             f"{self.cond_channels} (noisy latents, mask, image latent)")
        if self.action is not None:
            a = self.action_config
            if a.img_hidden_size != self.dim:
                raise ValueError(f"action_config img_hidden_size {a.img_hidden_size} must equal dim {self.dim}")
            bad = [b for b in a.blocks if not 0 <= b < self.num_layers]
            if bad:
                raise ValueError(f"action_config blocks {bad} are not layers of a {self.num_layers}-layer model")

    @property
    def action_config(self) -> ActionConfig | None:
        if self.action is None:
            return None
        a = self.action if isinstance(self.action, ActionConfig) else ActionConfig.from_dict(
            dict(self.action), what="action_config")
        return a

    @classmethod
    def from_release(cls, kw: dict, *, variant: str = "") -> "MatrixGameConfig":
        """The release's ``config.json`` (``CausalWanModel`` keyword arguments) -> a config. Keys that change
        nothing in inference (``text_len``, ``inject_sample_info``, ...) are ignored; an ``i2v`` model is required."""
        if kw.get("model_type", "i2v") != "i2v":
            raise ValueError(f"a Matrix-Game model is model_type 'i2v', got {kw.get('model_type')!r}")
        out = dict(variant=variant)
        for k in ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "in_dim", "out_dim", "eps", "qk_norm",
                  "cross_attn_norm", "local_attn_size", "sink_size"):
            if k in kw:
                check_kind(kw[k], float if k == "eps" else bool if k in ("qk_norm", "cross_attn_norm") else int,
                           f"config.json {k}")
                out[k] = kw[k]
        if "patch_size" in kw:
            out["patch_size"] = tuple(kw["patch_size"])
        if kw.get("action_config"):
            act = dict(kw["action_config"])
            ActionConfig.from_dict(act, what="config.json action_config")
            out["action"] = act
        if "image_dim" in kw:
            out["image_dim"] = int(kw["image_dim"])
        out.setdefault("image_dim", 1280)
        return cls(**out)


class ActionBlock(Block):
    """A transformer block with the action module between its cross-attention and its FFN."""

    def __init__(self, cfg: MatrixGameConfig, layer: int):
        super().__init__(cfg, layer)
        self.action_model = ActionModule(cfg.action_config, cfg.dim, layer)

    def run(self, x, e0, ctx_kv, cos, sin, backend, meta, frames, cond, frame_pos):
        B, L, d = x.shape
        q, k, v, k_raw = self.before_attention(x, e0, cos, sin, frames)
        attn = backend.attend(q, k, v, self.self_attn.layer, meta, k_raw=k_raw)
        e = (self.modulation[:, None].float() + e0.float()).chunk(6, dim=2)
        y = self.self_attn.o(attn.reshape(B, L, -1))
        x = (x.float() + self._gate(y, e[2], frames)).to(x.dtype)
        x = x + self.cross_attn(self.norm3(x), ctx_kv)
        x = self.action_model(x, cond, frame_pos, meta, frames, exact=isinstance(backend, ReferenceBackend))
        y = self.ffn(self._mod(self.norm2(x), e[3], e[4], frames).to(x.dtype))
        return (x.float() + self._gate(y, e[5], frames)).to(x.dtype)


class ImageEmbedding(nn.Module):
    """CLIP image tokens -> cross-attention context: LayerNorm, Linear, GELU (exact), Linear, LayerNorm."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, dim), nn.LayerNorm(dim))

    def forward(self, x):
        return self.proj(x)


class MatrixGameDiT(CausalWanDiT):
    """See the module docstring. ``forward`` takes the engine's arguments; ``actions`` is a FrameConditions."""

    def __init__(self, cfg: MatrixGameConfig):
        nn.Module.__init__(self)
        self.config = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.img_emb = ImageEmbedding(cfg.image_dim, d)
        acts = set(cfg.action_config.blocks) if cfg.action is not None else set()
        self.blocks = nn.ModuleList([ActionBlock(cfg, i) if i in acts else Block(cfg, i)
                                     for i in range(cfg.num_layers)])
        self.head = Head(cfg)

    @property
    def action_config(self) -> ActionConfig | None:
        return self.config.action_config

    def cache_groups(self, page_tokens: int) -> dict:
        """The action modules' per-page caches (see ActionModule.cache_groups)."""
        out = {}
        for blk in self.blocks:
            if isinstance(blk, ActionBlock):
                out.update(blk.action_model.cache_groups(page_tokens))
        return out

    def prepare_text(self, image_tokens: torch.Tensor) -> TextKV:
        """The image tokens [B, N, image_dim] (CLIP's penultimate layer) -> every layer's cross-attention K/V."""
        cfg = self.config
        if image_tokens.dim() != 3 or image_tokens.shape[-1] != cfg.image_dim:
            raise ValueError(f"image tokens must be [B, N, {cfg.image_dim}], got {tuple(image_tokens.shape)}")
        p = next(self.parameters())
        ctx = self.img_emb(image_tokens.to(device=p.device, dtype=p.dtype))
        return TextKV([blk.cross_attn.context_kv(ctx) for blk in self.blocks])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context, *, frame_pos: torch.Tensor | None = None,
                meta=None, backend=None, actions: FrameConditions | None = None, rope: tuple | None = None,
                kv_only: bool = False) -> torch.Tensor | None:
        """x [B, F, out_dim, H, W] noisy latents; actions: the rows' FrameConditions (required). Otherwise as
        ``CausalWanDiT.forward``."""
        cfg = self.config
        if not isinstance(actions, FrameConditions):
            raise ValueError("a Matrix-Game model needs its frame conditions (mask + image latent, actions)")
        if x.dim() != 5 or x.shape[2] != cfg.out_dim:
            raise ValueError(f"latents must be [B, F, {cfg.out_dim}, H, W], got {tuple(x.shape)}")
        B, Fr, C, H, W = x.shape
        if tuple(actions.concat.shape) != (B, Fr, cfg.cond_channels, H, W):
            raise ValueError(f"frame conditions must be [B, F, {cfg.cond_channels}, H, W] = "
                             f"{[B, Fr, cfg.cond_channels, H, W]}, got {list(actions.concat.shape)}")
        h, w = patch_grid(cfg, H, W)
        _, ph, pw = cfg.patch_size
        timestep, frame_pos = per_frame(timestep, frame_pos, B, Fr, x.device)
        backend = backend or ReferenceBackend()
        if getattr(backend, "sequence_parallel", None) is not None:
            raise ValueError("Matrix-Game models do not run under sequence parallelism yet")
        if not isinstance(context, TextKV):
            context = self.prepare_text(context)
        p = next(self.parameters())
        inp = torch.cat([x.to(p.dtype), actions.concat.to(device=x.device, dtype=p.dtype)], dim=2)
        tokens = self.patch_embedding(inp.permute(0, 2, 1, 3, 4)).flatten(2).transpose(1, 2)
        cos, sin = rope if rope is not None else self.rope_for(frame_pos.to(x.device), h, w)
        e, e0 = self.time_embed(timestep, None)
        last = len(self.blocks) - 1
        fpos = frame_pos.to(x.device)
        for i, (blk, kv) in enumerate(zip(self.blocks, context.kv)):
            if isinstance(blk, ActionBlock):
                tokens = blk.run(tokens, e0, kv, cos, sin, backend, meta, Fr, actions, fpos)
            else:
                tokens = blk(tokens, e0, kv, cos, sin, backend, meta, Fr, kv_only=kv_only and i == last)
        if kv_only:
            return None
        out = self.head(tokens, e, Fr)
        out = out.float().view(B, Fr, h, w, ph, pw, cfg.out_dim)
        return out.permute(0, 1, 6, 2, 4, 3, 5).reshape(B, Fr, cfg.out_dim, H, W)

    def compile_blocks(self, mode: str | None = "default") -> None:
        """The plain blocks' halves compile as in the Wan DiT; action blocks stay eager (their context grows)."""
        super().compile_blocks(mode)
