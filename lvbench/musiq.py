"""MUSIQ (Ke et al., ICCV 2021), the multi-scale image quality transformer behind the protocol's clarity VDE.

Written for this project from the paper's description and the published PyTorch port's parameter layout, so
the SPAQ checkpoint the protocol uses (``musiq_spaq_ckpt-358bb6af.pth``, state-dict keys such as
``conv_root.weight``, ``block1.conv1.weight``, ``transformer_encoder.encoderblock_0.attention.query.weight``)
loads with ``strict=True``. Inputs are RGB in [0, 1], [B, 3, H, W]; the output is the predicted quality
(the SPAQ head is a single regression unit on a 0-100 scale).

Pipeline: the image is represented at several scales (long side 224 and 384, aspect kept, bicubic, plus
the native resolution); each scale is cut into 32x32 patches (TensorFlow 'SAME' padding) that carry a
hashed 10x10 spatial position and a scale index; each patch goes through a weight-standardised ResNet
stem; a 14-layer transformer reads the patch tokens and a class token, and the head scores the class token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MusiqConfig:
    patch_size: int = 32
    hidden_size: int = 384
    mlp_dim: int = 1152
    num_heads: int = 6
    num_layers: int = 14
    num_scales: int = 3  # two resized scales + native resolution
    grid_size: int = 10  # hashed spatial position grid
    num_classes: int = 1  # 1 = regression head (SPAQ, KonIQ); 10 = score distribution (AVA)
    longer_side_lengths: list[int] = field(default_factory=lambda: [224, 384])
    max_seq_len_native: int = -1  # patches kept from the native scale; -1 = all

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.patch_size % 4:
            raise ValueError(f"patch_size must be a multiple of 4 (stem stride), got {self.patch_size}")
        if self.num_scales != len(self.longer_side_lengths) + 1:
            raise ValueError(f"num_scales={self.num_scales} must be len(longer_side_lengths)+1 "
                             f"= {len(self.longer_side_lengths) + 1}")


def _same_pad(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow 'SAME' padding for a k x k window at stride s (extra pixel goes bottom/right)."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
    pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)


class StdConv2d(nn.Conv2d):
    """Convolution with weight standardisation (per output channel: zero mean, unit std) and SAME padding."""

    def forward(self, x):
        w = self.weight
        # unbiased std, eps 1e-5: the convention the released checkpoints were converted with
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(_same_pad(x, self.kernel_size[0], self.stride[0]), w, self.bias, self.stride)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = StdConv2d(cin, cin, 1, bias=False)
        self.gn1 = nn.GroupNorm(32, cin, eps=1e-4)
        self.conv2 = StdConv2d(cin, cin, 3, bias=False)
        self.gn2 = nn.GroupNorm(32, cin, eps=1e-4)
        self.conv3 = StdConv2d(cin, cout, 1, bias=False)
        self.gn3 = nn.GroupNorm(32, cout, eps=1e-4)
        self.conv_proj = StdConv2d(cin, cout, 1, bias=False)
        self.gn_proj = nn.GroupNorm(32, cout, eps=1e-4)

    def forward(self, x):
        skip = self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(y + skip)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, mask):
        b, n, c = x.shape
        d = c // self.heads
        # [B, N, C] -> [B, heads, N, d]
        q, k, v = (f(x).reshape(b, n, self.heads, d).transpose(1, 2) for f in (self.query, self.key, self.value))
        logits = (q @ k.transpose(-2, -1)) * d**-0.5
        # padded tokens neither attend nor are attended to; -1e3 rather than -inf keeps fully padded
        # rows finite, as the released model was trained with
        pair = mask[:, None, :, None] & mask[:, None, None, :]
        logits = logits.masked_fill(~pair, -1e3)
        y = logits.softmax(-1) @ v  # [B, heads, N, d]
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, mlp_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x, mask):
        x = x + self.attention(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class _PositionEmb(nn.Module):
    def __init__(self, grid: int, dim: int):
        super().__init__()
        self.position_emb = nn.Parameter(torch.randn(1, grid * grid, dim) * 0.02)


class _ScaleEmb(nn.Module):
    def __init__(self, scales: int, dim: int):
        super().__init__()
        self.scale_emb = nn.Parameter(torch.randn(scales, dim) * 0.02)


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: MusiqConfig):
        super().__init__()
        self.posembed_input = _PositionEmb(cfg.grid_size, cfg.hidden_size)
        self.scaleembed_input = _ScaleEmb(cfg.num_scales, cfg.hidden_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.encoder_norm = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.transformer = nn.ModuleDict(
            {f"encoderblock_{i}": EncoderBlock(cfg.hidden_size, cfg.mlp_dim, cfg.num_heads)
             for i in range(cfg.num_layers)})

    def forward(self, x, spatial, scale, mask):
        x = x + self.posembed_input.position_emb[0][spatial] + self.scaleembed_input.scale_emb[scale]
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1)  # [B, 1+N, C]
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        for blk in self.transformer.values():
            x = blk(x, mask)
        return self.encoder_norm(x)


def _hashed_positions(grid: int, count_h: int, count_w: int) -> torch.Tensor:
    """Map a count_h x count_w patch grid onto the fixed grid x grid embedding table (nearest), [H*W]."""
    rows = (torch.arange(count_h) * grid) // count_h
    cols = (torch.arange(count_w) * grid) // count_w
    return (rows[:, None] * grid + cols[None, :]).reshape(-1)


def multiscale_patches(img: torch.Tensor, cfg: MusiqConfig):
    """Patch tokens of every scale for a batch [B, 3, H, W] in [-1, 1].

    Returns patches [B, N, 3, P, P], spatial index [B, N], scale index [B, N], mask [B, N] (bool).
    The resized scales are padded or cut to ceil(L / P)^2 tokens so that every image gives the same
    sequence layout; padding tokens are masked out.
    """
    b, c, h, w = img.shape
    p = cfg.patch_size
    parts = []
    scales = [(s, i) for i, s in enumerate(sorted(cfg.longer_side_lengths))]
    for longer, sid in scales + [(None, len(scales))]:
        if longer is None:
            x, max_len = img, cfg.max_seq_len_native
        else:
            r = longer / max(h, w)
            x = F.interpolate(img, (round(h * r), round(w * r)), mode="bicubic", align_corners=False)
            max_len = math.ceil(longer / p) ** 2
        ch, cw = math.ceil(x.shape[-2] / p), math.ceil(x.shape[-1] / p)
        x = _same_pad(x, p, p)
        # [B, 3, ch*P, cw*P] -> [B, ch*cw, 3, P, P] in row-major patch order
        tok = x.reshape(b, c, ch, p, cw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, ch * cw, c, p, p)
        spatial = _hashed_positions(cfg.grid_size, ch, cw).to(img.device).expand(b, -1)
        mask = torch.ones(b, ch * cw, dtype=torch.bool, device=img.device)
        if max_len >= 0:
            n = ch * cw
            if n < max_len:
                pad = max_len - n
                tok = torch.cat([tok, tok.new_zeros(b, pad, c, p, p)], 1)
                spatial = torch.cat([spatial, spatial.new_zeros(b, pad)], 1)
                mask = torch.cat([mask, mask.new_zeros(b, pad)], 1)
            tok, spatial, mask = tok[:, :max_len], spatial[:, :max_len], mask[:, :max_len]
        parts.append((tok, spatial, torch.full_like(spatial, sid), mask))
    return tuple(torch.cat(t, 1) for t in zip(*parts))


class MUSIQ(nn.Module):
    def __init__(self, cfg: MusiqConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or MusiqConfig()
        stem = 64
        self.conv_root = StdConv2d(3, stem, 7, stride=2, bias=False)
        self.gn_root = nn.GroupNorm(32, stem, eps=1e-6)
        self.block1 = Bottleneck(stem, stem * 4)
        tokens = cfg.patch_size // 4  # stem stride 2 x max-pool stride 2
        self.embedding = nn.Linear(stem * 4 * tokens * tokens, cfg.hidden_size)
        self.transformer_encoder = TransformerEncoder(cfg)
        if cfg.num_classes > 1:
            self.head = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.num_classes), nn.Softmax(-1))
        else:
            self.head = nn.Linear(cfg.hidden_size, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img: [B, 3, H, W] RGB in [0, 1] -> quality [B]."""
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"MUSIQ expects [B, 3, H, W], got {tuple(img.shape)}")
        x = img * 2.0 - 1.0
        tok, spatial, scale, mask = multiscale_patches(x, self.cfg)
        b, n = tok.shape[:2]
        p = self.cfg.patch_size
        y = self.gn_root(self.conv_root(tok.reshape(b * n, 3, p, p)))
        y = F.max_pool2d(_same_pad(F.relu(y), 3, 2), 3, 2)
        y = self.block1(y)  # [B*N, 256, P/4, P/4]
        # channels-last flattening, the order the embedding weights were trained with
        y = self.embedding(y.permute(0, 2, 3, 1).reshape(b, n, -1))
        y = self.transformer_encoder(y, spatial.long(), scale.long(), mask)
        q = self.head(y[:, 0])
        if self.cfg.num_classes > 1:  # score distribution over 1..K -> mean opinion score
            levels = torch.arange(1, self.cfg.num_classes + 1, dtype=q.dtype, device=q.device)
            q = (q * levels).sum(-1, keepdim=True)
        return q[:, 0]
