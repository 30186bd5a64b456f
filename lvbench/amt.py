"""AMT-S (Li et al., CVPR 2023, "All-Pairs Multi-Field Transforms"), the frame-interpolation network behind
the protocol's motion-smoothness VDE.

Written for this project from the paper and the published model's parameter layout so that the released
``amt-s.pth`` checkpoint (``state_dict`` keys such as ``feat_encoder.conv1.weight``,
``encoder.pyramid1.0.0.weight``, ``decoder4.convblock.0.0.weight``, ``update4.gru.0.weight``,
``comb_block.0.weight``) loads with ``strict=True``.

Structure: a RAFT-style feature encoder (1/8 resolution) builds an all-pairs correlation volume between
the two input frames, looked up in both directions; an IFRNet-style pyramid encoder (1/2 .. 1/16) and a
coarse-to-fine decoder predict the two flows from the middle frame to the inputs plus an intermediate
feature, each scale refined by a small update block reading the correlation; the finest decoder emits
``num_flows`` flow pairs, blend masks and residuals, which are warped, blended and merged by a small conv.
Inputs are RGB in [0, 1], [B, 3, H, W] with H, W multiples of 16 (see ``pad16``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def resize(x: torch.Tensor, scale: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


def warp(img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: out(p) = img(p + flow(p)), bilinear, border padding. flow [B, 2, H, W] as (dx, dy)."""
    b, _, h, w = flow.shape
    kw = dict(dtype=flow.dtype, device=flow.device)
    ys, xs = torch.meshgrid(torch.arange(h, **kw), torch.arange(w, **kw), indexing="ij")
    x = xs + flow[:, 0]
    y = ys + flow[:, 1]
    # pixel centres -> [-1, 1] with align_corners=True: 0 -> -1, W-1 -> +1
    grid = torch.stack([2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1], dim=-1)
    return F.grid_sample(img, grid.to(img.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def coords_grid(b: int, h: int, w: int) -> torch.Tensor:
    """Pixel coordinates [B, 2, H, W] with channel 0 = x, channel 1 = y."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([xs, ys])[None].expand(b, -1, -1, -1)


def sample_at(img: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of img [N, C, H, W] at pixel coords [N, h, w, 2] (x, y), zeros outside."""
    h, w = img.shape[-2:]
    x = 2 * coords[..., 0] / max(w - 1, 1) - 1
    y = 2 * coords[..., 1] / max(h - 1, 1) - 1
    return F.grid_sample(img, torch.stack([x, y], -1), align_corners=True)


# ------------------------------------------------------------------------------------------------ encoders
class _Bottleneck(nn.Module):
    """Bottleneck residual block with parameter-free instance norm (RAFT small encoder)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        mid = cout // 4
        self.conv1 = nn.Conv2d(cin, mid, 1)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1)
        self.conv3 = nn.Conv2d(mid, cout, 1)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride), nn.InstanceNorm2d(cout)) \
            if stride != 1 else None

    def forward(self, x):
        y = F.relu(F.instance_norm(self.conv1(x)))
        y = F.relu(F.instance_norm(self.conv2(y)))
        y = F.relu(F.instance_norm(self.conv3(y)))
        return F.relu((self.downsample(x) if self.downsample is not None else x) + y)


class SmallEncoder(nn.Module):
    """1/8-resolution matching features."""

    def __init__(self, out_dim: int = 84):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 7, stride=2, padding=3)
        self.layer1 = nn.Sequential(_Bottleneck(32, 32, 1), _Bottleneck(32, 32, 1))
        self.layer2 = nn.Sequential(_Bottleneck(32, 64, 2), _Bottleneck(64, 64, 1))
        self.layer3 = nn.Sequential(_Bottleneck(64, 96, 2), _Bottleneck(96, 96, 1))
        self.conv2 = nn.Conv2d(96, out_dim, 1)

    def forward(self, x):
        x = F.relu(F.instance_norm(self.conv1(x)))
        return self.conv2(self.layer3(self.layer2(self.layer1(x))))


def convrelu(cin: int, cout: int, k: int = 3, s: int = 1, p: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, p), nn.PReLU(cout))


class ResBlock(nn.Module):
    """Residual block whose last ``side`` channels get an extra conv (IFRNet side channels)."""

    def __init__(self, ch: int, side: int):
        super().__init__()
        self.side = side
        self.conv1 = convrelu(ch, ch)
        self.conv2 = convrelu(side, side)
        self.conv3 = convrelu(ch, ch)
        self.conv4 = convrelu(side, side)
        self.conv5 = nn.Conv2d(ch, ch, 3, 1, 1)
        self.prelu = nn.PReLU(ch)

    def forward(self, x):
        s = self.side
        y = self.conv1(x)
        y = self.conv3(torch.cat([y[:, :-s], self.conv2(y[:, -s:])], 1))
        y = self.conv5(torch.cat([y[:, :-s], self.conv4(y[:, -s:])], 1))
        return self.prelu(x + y)


class PyramidEncoder(nn.Module):
    def __init__(self, channels: list[int]):
        super().__init__()
        prev = 3
        for i, ch in enumerate(channels, 1):
            self.add_module(f"pyramid{i}", nn.Sequential(convrelu(prev, ch, 3, 2, 1), convrelu(ch, ch)))
            prev = ch
        self.depth = len(channels)

    def forward(self, x):
        feats = []
        for i in range(1, self.depth + 1):
            x = getattr(self, f"pyramid{i}")(x)
            feats.append(x)
        return feats


# ------------------------------------------------------------------------------------------------ decoders
class InitDecoder(nn.Module):
    def __init__(self, cin: int, cout: int, side: int):
        super().__init__()
        self.convblock = nn.Sequential(convrelu(cin * 2 + 1, cin * 2), ResBlock(cin * 2, side),
                                       nn.ConvTranspose2d(cin * 2, cout + 4, 4, 2, 1))

    def forward(self, f0, f1, embt):
        t = embt.expand(f0.shape[0], 1, *f0.shape[2:])
        out = self.convblock(torch.cat([f0, f1, t], 1))
        return out[:, 0:2], out[:, 2:4], out[:, 4:]


class IntermediateDecoder(nn.Module):
    def __init__(self, cin: int, cout: int, side: int):
        super().__init__()
        self.convblock = nn.Sequential(convrelu(cin * 3 + 4, cin * 3), ResBlock(cin * 3, side),
                                       nn.ConvTranspose2d(cin * 3, cout + 4, 4, 2, 1))

    def forward(self, ft, f0, f1, flow0, flow1):
        out = self.convblock(torch.cat([ft, warp(f0, flow0), warp(f1, flow1), flow0, flow1], 1))
        # the decoder predicts residuals over the upsampled coarser flows (x2 for the doubled resolution)
        return (out[:, 0:2] + 2.0 * resize(flow0, 2.0), out[:, 2:4] + 2.0 * resize(flow1, 2.0), out[:, 4:])


class MultiFlowDecoder(nn.Module):
    def __init__(self, cin: int, side: int, num_flows: int):
        super().__init__()
        self.n = num_flows
        self.convblock = nn.Sequential(convrelu(cin * 3 + 4, cin * 3), ResBlock(cin * 3, side),
                                       nn.ConvTranspose2d(cin * 3, 8 * num_flows, 4, 2, 1))

    def forward(self, ft, f0, f1, flow0, flow1):
        n = self.n
        out = self.convblock(torch.cat([ft, warp(f0, flow0), warp(f1, flow1), flow0, flow1], 1))
        d0, d1, mask, res = torch.split(out, [2 * n, 2 * n, n, 3 * n], 1)
        flow0 = d0 + 2.0 * resize(flow0, 2.0).repeat(1, n, 1, 1)
        flow1 = d1 + 2.0 * resize(flow1, 2.0).repeat(1, n, 1, 1)
        return flow0, flow1, torch.sigmoid(mask), res


class UpdateBlock(nn.Module):
    """Reads the correlation and the current flows, returns feature and flow residuals."""

    def __init__(self, cdim: int, hidden: int = 76, flow_dim: int = 20, corr_dim: int = 64, fc_dim: int = 68,
                 corr_levels: int = 4, radius: int = 3, scale: int | None = None):
        super().__init__()
        planes = corr_levels * (2 * radius + 1) ** 2
        self.scale = scale
        self.convc1 = nn.Conv2d(2 * planes, corr_dim, 1)
        self.convf1 = nn.Conv2d(4, flow_dim * 2, 7, padding=3)
        self.convf2 = nn.Conv2d(flow_dim * 2, flow_dim, 3, padding=1)
        self.conv = nn.Conv2d(corr_dim + flow_dim, fc_dim, 3, padding=1)
        self.gru = nn.Sequential(nn.Conv2d(fc_dim + 4 + cdim, hidden, 3, padding=1), nn.LeakyReLU(0.1),
                                 nn.Conv2d(hidden, hidden, 3, padding=1))
        self.feat_head = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.LeakyReLU(0.1),
                                       nn.Conv2d(hidden, cdim, 3, padding=1))
        self.flow_head = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.LeakyReLU(0.1),
                                       nn.Conv2d(hidden, 4, 3, padding=1))

    def forward(self, net, flow, corr):
        if self.scale is not None:  # work at the correlation's 1/8 resolution
            net = resize(net, 1.0 / self.scale)
        c = F.leaky_relu(self.convc1(corr), 0.1)
        f = F.leaky_relu(self.convf2(F.leaky_relu(self.convf1(flow), 0.1)), 0.1)
        x = F.leaky_relu(self.conv(torch.cat([c, f], 1)), 0.1)
        h = self.gru(torch.cat([x, flow, net], 1))
        d_net, d_flow = self.feat_head(h), self.flow_head(h)
        if self.scale is not None:
            d_net = resize(d_net, self.scale)
            d_flow = self.scale * resize(d_flow, self.scale)
        return d_net, d_flow


class BidirCorrelation:
    """All-pairs correlation pyramid between two 1/8 feature maps, looked up around given coordinates in
    both directions (frame 0 -> frame 1 and frame 1 -> frame 0)."""

    def __init__(self, fmap0: torch.Tensor, fmap1: torch.Tensor, levels: int = 4, radius: int = 3):
        self.levels, self.radius = levels, radius
        b, c, h, w = fmap0.shape
        # [B, h*w, h*w] scaled dot products; row = pixel of frame 0, column = pixel of frame 1
        corr = fmap0.reshape(b, c, h * w).transpose(1, 2) @ fmap1.reshape(b, c, h * w) / c**0.5
        fwd = corr.reshape(b * h * w, 1, h, w)  # for each frame-0 pixel, a map over frame 1
        bwd = corr.transpose(1, 2).reshape(b * h * w, 1, h, w)  # for each frame-1 pixel, a map over frame 0
        self.fwd, self.bwd = [fwd], [bwd]
        for _ in range(levels - 1):
            self.fwd.append(F.avg_pool2d(self.fwd[-1], 2, 2))
            self.bwd.append(F.avg_pool2d(self.bwd[-1], 2, 2))

    def __call__(self, coords0: torch.Tensor, coords1: torch.Tensor):
        r = self.radius
        b, _, h, w = coords0.shape
        d = torch.arange(-r, r + 1, dtype=coords0.dtype, device=coords0.device)
        # window offsets [2r+1, 2r+1, 2]; the first window axis offsets x and the second y, the layout
        # the released update blocks were trained with
        delta = torch.stack(torch.meshgrid(d, d, indexing="ij"), -1)
        outs = []
        for pyr, coords in ((self.fwd, coords0), (self.bwd, coords1)):
            c = coords.permute(0, 2, 3, 1).reshape(b * h * w, 1, 1, 2)
            level = []
            for i, vol in enumerate(pyr):
                s = sample_at(vol, c / 2**i + delta[None])  # [B*h*w, 1, 2r+1, 2r+1]
                level.append(s.reshape(b, h, w, -1))
            outs.append(torch.cat(level, -1).permute(0, 3, 1, 2).contiguous())
        return outs[0], outs[1]


# ------------------------------------------------------------------------------------------------ model
class AMTS(nn.Module):
    def __init__(self, corr_radius: int = 3, corr_levels: int = 4, num_flows: int = 3,
                 channels: tuple[int, ...] = (20, 32, 44, 56), skip_channels: int = 20):
        super().__init__()
        self.radius, self.levels, self.num_flows = corr_radius, corr_levels, num_flows
        c = list(channels)
        self.feat_encoder = SmallEncoder(84)
        self.encoder = PyramidEncoder(c)
        self.decoder4 = InitDecoder(c[3], c[2], skip_channels)
        self.decoder3 = IntermediateDecoder(c[2], c[1], skip_channels)
        self.decoder2 = IntermediateDecoder(c[1], c[0], skip_channels)
        self.decoder1 = MultiFlowDecoder(c[0], skip_channels, num_flows)
        kw = dict(corr_levels=corr_levels, radius=corr_radius)
        self.update4 = UpdateBlock(c[2], **kw)
        self.update3 = UpdateBlock(c[1], scale=2, **kw)
        self.update2 = UpdateBlock(c[0], scale=4, **kw)
        self.comb_block = nn.Sequential(nn.Conv2d(3 * num_flows, 6 * num_flows, 3, 1, 1),
                                        nn.PReLU(6 * num_flows), nn.Conv2d(6 * num_flows, 3, 3, 1, 1))

    def _lookup(self, corr, coord, flow0, flow1, embt, down: int):
        # flows point from the middle frame (time t) to frames 0 and 1; under linear motion the flow
        # from frame 0 to frame 1 is flow1 / t and the reverse is flow0 / (1 - t)
        if down != 1:
            flow0 = resize(flow0, 1.0 / down) / down
            flow1 = resize(flow1, 1.0 / down) / down
        c0, c1 = corr(coord + flow1 / embt, coord + flow0 / (1.0 - embt))
        return torch.cat([c0, c1], 1), torch.cat([flow0, flow1], 1)

    def _refine(self, update, corr, coord, ft, flow0, flow1, embt, down):
        c, flows = self._lookup(corr, coord, flow0, flow1, embt, down)
        d_ft, d_flow = update(ft, flows, c)
        return ft + d_ft, flow0 + d_flow[:, 0:2], flow1 + d_flow[:, 2:4]

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, embt: torch.Tensor) -> torch.Tensor:
        """Predict the frame at time ``embt`` ([B or 1, 1, 1, 1], in (0, 1)) between img0 and img1."""
        if img0.shape != img1.shape or img0.ndim != 4 or img0.shape[1] != 3:
            raise ValueError(f"AMT-S expects two [B, 3, H, W] images, got {tuple(img0.shape)}, {tuple(img1.shape)}")
        if img0.shape[-2] % 16 or img0.shape[-1] % 16 or min(img0.shape[-2:]) < 64:
            raise ValueError(f"AMT-S needs H, W divisible by 16 and >= 64 (use pad16), got {tuple(img0.shape[-2:])}")
        embt = embt.reshape(-1, 1, 1, 1).to(img0.dtype)
        # one scalar mean per sample over both frames, removed before and added back after
        mean = torch.cat([img0, img1], 2).mean(dim=(1, 2, 3), keepdim=True)
        img0, img1 = img0 - mean, img1 - mean
        b, _, h, w = img0.shape
        coord = coords_grid(b, h // 8, w // 8).to(img0)
        fmap0, fmap1 = self.feat_encoder(torch.cat([img0, img1])).chunk(2)
        corr = BidirCorrelation(fmap0, fmap1, self.levels, self.radius)
        f0 = self.encoder(img0)
        f1 = self.encoder(img1)

        flow0, flow1, ft = self.decoder4(f0[3], f1[3], embt)  # 1/8
        ft, flow0, flow1 = self._refine(self.update4, corr, coord, ft, flow0, flow1, embt, 1)
        flow0, flow1, ft = self.decoder3(ft, f0[2], f1[2], flow0, flow1)  # 1/4
        ft, flow0, flow1 = self._refine(self.update3, corr, coord, ft, flow0, flow1, embt, 2)
        flow0, flow1, ft = self.decoder2(ft, f0[1], f1[1], flow0, flow1)  # 1/2
        ft, flow0, flow1 = self._refine(self.update2, corr, coord, ft, flow0, flow1, embt, 4)
        flow0, flow1, mask, res = self.decoder1(ft, f0[0], f1[0], flow0, flow1)  # full resolution

        n = self.num_flows
        # [B, n*2, H, W] -> [B*n, 2, H, W]: warp every candidate flow pair in one call
        flow0 = flow0.reshape(b * n, 2, h, w)
        flow1 = flow1.reshape(b * n, 2, h, w)
        mask = mask.reshape(b * n, 1, h, w)
        res = res.reshape(b * n, 3, h, w)
        rep = lambda x: x.repeat_interleave(n, 0)  # noqa: E731  [B, ...] -> [B*n, ...]
        cand = mask * warp(rep(img0), flow0) + (1 - mask) * warp(rep(img1), flow1) + rep(mean) + res
        cand = cand.reshape(b, n * 3, h, w)
        pred = cand.reshape(b, n, 3, h, w).mean(1) + self.comb_block(cand)
        return pred.clamp(0, 1)


def pad16(x: torch.Tensor, minimum: int = 64) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Replicate-pad [B, C, H, W] to multiples of 16 (and at least ``minimum``), split evenly; returns the
    padded tensor and the pads. Four correlation levels at 1/8 resolution need H, W >= 64."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % 16 + max(0, minimum - h - (-h) % 16), (-w) % 16 + max(0, minimum - w - (-w) % 16)
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return F.pad(x, pads, mode="replicate"), pads


def unpad(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    l, r, t, b = pads
    return x[..., t: x.shape[-2] - b, l: x.shape[-1] - r]
