"""TAEHV: a tiny causal video autoencoder for Wan2.1 latents, with a block-by-block streaming decoder.

The architecture is TAEHV (github.com/madebyollin/taehv, MIT), built here with the same module layout so its
published Wan2.1 weights load by name: ``taew2_1.pth`` / ``.safetensors``, and lightx2v's ``lighttaew2_1``, which
lightx2v loads into that same layout. The decoder is a stack of 2-D convs over single frames; its only temporal
parts are

- ``MemBlock``: conv(concat(x_t, x_{t-1})) + x_t, where x_{t-1} is the block's input one frame earlier (zeros for
  a stream's first frame), so each MemBlock remembers one frame;
- ``TGrow``: a 1x1 conv to ``stride`` times the channels, split into ``stride`` consecutive frames.

The two TGrows with stride 2 turn each latent frame into 4 pixel frames; the first 3 frames of a stream are
dropped, so n latent frames give 1 + 4 (n - 1) frames, as the Wan VAE does. The decoder's first layer soft-clamps
the latents to (-3, 3) (3 tanh(x / 3)); its output is RGB in [0, 1], clamped.

Streaming: a stream (``TAEHVStream``) keeps the last input frame of every MemBlock, so decoding a video block by
block equals decoding it whole. Convs run one frame per call by default (``frames_per_call=1``), which makes the
split invisible even bit for bit (CPU kernels may pick another algorithm for another batch size).

Latent scaling: ``taew2_1`` reads the latents the Wan DiT makes, i.e. the engine's normalised ones
(z - mean) / std; lightx2v feeds ``lighttaew2_1`` raw Wan VAE latents (z_norm * std + mean), so that variant
de-normalises first (and its encoder's output is normalised). ``load`` picks the variant from the file name
("lighttae" in it) unless told.

The encoder (when the checkpoint has it) maps frames in [0, 1] to latents, 4 frames per latent, the clip padded at
its end with copies of its last frame to a multiple of 4.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .tensor_files import CheckpointError, read_tensor_file
from .vae import CausalFrameCounts, video_to_encode

__all__ = ["TAEHVDecoder", "TAEHVStream", "VARIANTS", "wan21_latent_stats"]

VARIANTS = ("taehv", "lighttae")
_LATENT_CHANNELS = 16  # Wan2.1 latents
_DEC_WIDTHS = (256, 128, 64, 64)
_ENC_WIDTH = 64


def wan21_latent_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """The Wan2.1 VAE's per-channel latents_mean / latents_std (diffusers' AutoencoderKLWan defaults)."""
    import inspect
    from diffusers import AutoencoderKLWan
    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    return (torch.tensor(params["latents_mean"].default, dtype=torch.float32, device="cpu"),
            torch.tensor(params["latents_std"].default, dtype=torch.float32, device="cpu"))


# ---------------------------------------------------------------------------------------------------
# layers (parameter names as in the published checkpoints)
# ---------------------------------------------------------------------------------------------------
def _conv3(n_in: int, n_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """3 tanh(x / 3): identity near 0, bounded to (-3, 3)."""

    def forward(self, x):
        return 3.0 * torch.tanh(x / 3.0)


class MemBlock(nn.Module):
    """relu(conv(cat(x, past)) + x), ``past`` being the block's input one frame earlier."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(_conv3(2 * n, n), nn.ReLU(), _conv3(n, n), nn.ReLU(), _conv3(n, n))

    def forward(self, x, past):
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TPool(nn.Module):
    """Merge every ``stride`` consecutive frames [T, C, H, W] into one (channels stacked, then a 1x1 conv)."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n * stride, n, 1, bias=False)

    def forward(self, x):
        t, c, h, w = x.shape
        return self.conv(x.reshape(t // self.stride, self.stride * c, h, w))


class TGrow(nn.Module):
    """Split every frame [T, C, H, W] into ``stride`` consecutive frames (a 1x1 conv to stride * C channels)."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x):
        t, c, h, w = x.shape
        return self.conv(x).reshape(t * self.stride, c, h, w)


def _build_decoder(latent_channels: int) -> nn.Sequential:
    a, b, c, d = _DEC_WIDTHS
    return nn.Sequential(
        SoftClamp(), _conv3(latent_channels, a), nn.ReLU(),                                    # 0-2
        MemBlock(a), MemBlock(a), MemBlock(a), nn.Upsample(scale_factor=2), TGrow(a, 1),      # 3-7
        _conv3(a, b, bias=False),                                                              # 8
        MemBlock(b), MemBlock(b), MemBlock(b), nn.Upsample(scale_factor=2), TGrow(b, 2),      # 9-13
        _conv3(b, c, bias=False),                                                              # 14
        MemBlock(c), MemBlock(c), MemBlock(c), nn.Upsample(scale_factor=2), TGrow(c, 2),      # 15-19
        _conv3(c, d, bias=False), nn.ReLU(), _conv3(d, 3),                                     # 20-22
    )


def _build_encoder(latent_channels: int) -> nn.Sequential:
    n = _ENC_WIDTH
    layers = [_conv3(3, n), nn.ReLU()]
    for pool in (2, 2, 1):
        layers += [TPool(n, pool), _conv3(n, n, stride=2, bias=False), MemBlock(n), MemBlock(n), MemBlock(n)]
    layers.append(_conv3(n, latent_channels))
    return nn.Sequential(*layers)


@dataclass
class TAEHVStream:
    """Decoder state of one video: the last input frame of every decoder MemBlock, and how far the stream got."""
    memory: dict = field(default_factory=dict)  # decoder layer index -> [1, C, h', w']
    latent_frames: int = 0  # latent frames decoded so far
    pixel_frames: int = 0  # pixel frames returned so far


# ---------------------------------------------------------------------------------------------------
# the decoder
# ---------------------------------------------------------------------------------------------------
class TAEHVDecoder(CausalFrameCounts, nn.Module):
    """TAEHV for Wan2.1 latents behind the engine's decoder interface (``new_stream`` / ``decode_block`` /
    ``encode``, ``pixel_frames`` / ``latent_frames``, ``spatial_ratio`` / ``temporal_ratio``).

    ``variant``: "taehv" (reads normalised latents) or "lighttae" (raw latents). ``encoder=False`` builds the
    decoder only. ``frames_per_call``: frames per conv call (1: streaming bit-identical to a whole decode;
    None: every frame of a block in one call)."""

    temporal_ratio = 4
    spatial_ratio = 8
    frames_to_trim = 3  # raw frames dropped at a stream's start (temporal_ratio - 1)

    def __init__(self, variant: str = "taehv", *, encoder: bool = True, frames_per_call: int | None = 1,
                 latents_mean=None, latents_std=None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown TAEHV variant {variant!r}; known: {', '.join(VARIANTS)}")
        if frames_per_call is not None and (isinstance(frames_per_call, bool) or int(frames_per_call) < 1):
            raise ValueError(f"frames_per_call must be an int >= 1 or None, got {frames_per_call!r}")
        self.variant = variant
        self.frames_per_call = None if frames_per_call is None else int(frames_per_call)
        self.encoder = _build_encoder(_LATENT_CHANNELS) if encoder else None
        self.decoder = _build_decoder(_LATENT_CHANNELS)
        # the last MemBlock: every layer after it works frame by frame (run in small chunks to bound memory)
        self._tail = max(i for i, m in enumerate(self.decoder) if isinstance(m, MemBlock)) + 1
        if variant == "lighttae":
            if latents_mean is None or latents_std is None:
                latents_mean, latents_std = wan21_latent_stats()
            # plain float32 tensors, not buffers: module.to(float16) must not round the normalisation constants
            self.latents_mean = torch.as_tensor(latents_mean, dtype=torch.float32, device="cpu").flatten()
            self.latents_std = torch.as_tensor(latents_std, dtype=torch.float32, device="cpu").flatten()
            for what, t in (("latents_mean", self.latents_mean), ("latents_std", self.latents_std)):
                if t.numel() != _LATENT_CHANNELS:
                    raise ValueError(f"{what} has {t.numel()} entries, Wan2.1 latents have {_LATENT_CHANNELS}")
        else:
            self.latents_mean = self.latents_std = None
        self.eval()

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def random(cls, seed: int = 0, variant: str = "taehv", *, device="cpu", dtype: torch.dtype = torch.float32,
               **kw) -> "TAEHVDecoder":
        """Seeded random weights (PyTorch's default init), for tests and benchmarks."""
        with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG stream untouched
            torch.manual_seed(seed)
            model = cls(variant, **kw)
        return model.to(device=device, dtype=dtype)

    @classmethod
    def load(cls, path: str | os.PathLike, *, variant: str | None = None, device="cpu",
             dtype: torch.dtype = torch.float32, **kw) -> "TAEHVDecoder":
        """A TAEHV Wan2.1 weights file (``taew2_1.pth``, ``lighttaew2_1.safetensors``, ...); ``variant`` defaults
        to "lighttae" when the file name says so, else "taehv". Checkpoints without ``encoder.`` tensors give a
        decoder that cannot encode."""
        path = Path(path)
        if variant is None:
            variant = "lighttae" if "lighttae" in path.name.lower() else "taehv"
        obj, _ = read_tensor_file(path)
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict) and "decoder.1.weight" not in obj:
                obj = obj[key]
        bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{path}: the TAEHV state dict holds non-tensor values, refused: {bad[:5]}")
        has_encoder = any(k.startswith("encoder.") for k in obj)
        with torch.device("meta"):
            model = cls(variant, encoder=has_encoder, **kw)
        sd = _fit_state_dict(obj, model, path)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True,
                              assign=True)
        return model.to(device=device).eval()

    # ---- properties the engine needs -----------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return _LATENT_CHANNELS

    @property
    def has_encoder(self) -> bool:
        return self.encoder is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    # ---- running the layers ----------------------------------------------------------------------
    def _calls(self, fn, *xs: torch.Tensor) -> torch.Tensor:
        """fn over frames [T, ...], ``frames_per_call`` frames at a time."""
        k = self.frames_per_call
        t = xs[0].shape[0]
        if k is None or t <= k:
            return fn(*xs)
        return torch.cat([fn(*(x[i:i + k] for x in xs)) for i in range(0, t, k)])

    def _run(self, layers, x: torch.Tensor, memory: dict, start: int = 0) -> torch.Tensor:
        """Layers of a stack over frames x [T, C, H, W] in order; ``memory`` holds (and is updated with) the last
        input frame of each MemBlock, by layer index."""
        for i, layer in enumerate(layers, start):
            if isinstance(layer, MemBlock):
                prev = memory.get(i)
                if prev is None:
                    prev = torch.zeros_like(x[:1])
                elif prev.shape[1:] != x.shape[1:]:
                    raise ValueError(f"latents of {tuple(x.shape[1:])} at layer {i} do not continue the stream's "
                                     f"{tuple(prev.shape[1:])}: a stream keeps one latent size")
                past = torch.cat([prev, x[:-1]])
                memory[i] = x[-1:].clone()
                x = self._calls(layer, x, past)
            elif isinstance(layer, TPool):
                x = layer(x)
            else:
                x = self._calls(layer, x)
        return x

    def _decode(self, memory: dict, z: torch.Tensor) -> torch.Tensor:
        """Decoder latents [F, C, h, w] -> raw frames [4F, 3, H, W] in [0, 1] (float32), memory updated."""
        x = self._run(self.decoder[:self._tail], z.to(self.dtype), memory)
        tail = self.decoder[self._tail:]
        outs = [tail(x[i:i + 1]).float().clamp_(0, 1) for i in range(x.shape[0])]
        return torch.cat(outs)

    def _to_decoder_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Engine latents [1, F, C, h, w] (normalised) -> what this variant's decoder reads, [F, C, h, w]."""
        if latents.dim() != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"latents must be [B, F, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        if latents.shape[0] != 1:
            raise ValueError(f"a stream decodes one video: latents batch must be 1, got {latents.shape[0]}")
        z = latents[0].to(self.device, torch.float32)
        if self.variant == "lighttae":
            z = z * self.latents_std.to(z.device).view(1, -1, 1, 1) + self.latents_mean.to(z.device).view(1, -1, 1, 1)
        return z

    @staticmethod
    def to_uint8(frames: torch.Tensor) -> np.ndarray:
        """[T, 3, H, W] in [0, 1] -> uint8 [T, H, W, 3] (rounded, not truncated)."""
        v = (frames.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
        return v.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    # ---- decoding --------------------------------------------------------------------------------
    def new_stream(self) -> TAEHVStream:
        return TAEHVStream()

    @torch.no_grad()
    def decode_block_float(self, state: TAEHVStream, latents: torch.Tensor) -> torch.Tensor:
        """``decode_block`` before the uint8 conversion: float32 frames [T, 3, H, W] in [0, 1]."""
        if not isinstance(state, TAEHVStream):
            raise TypeError(f"state must be a TAEHVStream from new_stream(), got {type(state).__name__}")
        z = self._to_decoder_latents(latents)
        if z.shape[0] == 0:
            return torch.zeros(0, 3, z.shape[2] * self.spatial_ratio, z.shape[3] * self.spatial_ratio)
        frames = self._decode(state.memory, z)
        if state.latent_frames == 0:
            frames = frames[self.frames_to_trim:]
        state.latent_frames += z.shape[0]
        state.pixel_frames += frames.shape[0]
        return frames

    def decode_block(self, state: TAEHVStream, latents: torch.Tensor) -> np.ndarray:
        """Decode the next latent frames of a stream: latents [1, F, C, h, w] (normalised) -> uint8 [T, H, W, 3].

        T = 1 + 4 (F - 1) for the stream's first block and 4 F afterwards.
        """
        return self.to_uint8(self.decode_block_float(state, latents))

    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """One decode of a whole clip: latents [1, F, C, h, w] -> float32 frames [T, 3, H, W] in [0, 1]."""
        return self.decode_block_float(self.new_stream(), latents)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """One decode of a whole clip: latents [1, F, C, h, w] (normalised) -> uint8 [T, H, W, 3]."""
        return self.to_uint8(self.decode_float(latents))

    # ---- encoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, frames) -> torch.Tensor:
        """uint8 frames [T, H, W, 3] (T = 1 + 4k, H and W multiples of 8) -> normalised latents [1, F, C, h, w]."""
        if self.encoder is None:
            raise ValueError("this TAEHV checkpoint has no encoder (no 'encoder.' tensors): it cannot encode "
                             "init frames; load a file with the encoder or start from no frames")
        x = video_to_encode(frames, self.temporal_ratio, self.spatial_ratio)
        T, r = x.shape[0], self.temporal_ratio
        v = (x.to(self.device).float() / 255.0).permute(0, 3, 1, 2)  # [T, 3, H, W] in [0, 1]
        v = torch.cat([v, v[-1:].expand(-T % r, -1, -1, -1)])  # pad the end to a multiple of 4
        z = self._run(self.encoder, v.to(self.dtype), {}).float()  # [F, C, h, w]
        if self.variant == "lighttae":
            z = (z - self.latents_mean.to(z.device).view(1, -1, 1, 1)) / self.latents_std.to(z.device).view(1, -1, 1, 1)
        return z[None]


# ---------------------------------------------------------------------------------------------------
# checking a state dict against the layout
# ---------------------------------------------------------------------------------------------------
def _fit_state_dict(sd: dict, model: TAEHVDecoder, path) -> dict:
    """``sd`` checked against ``model``'s keys and shapes (one-line CheckpointError naming the first bad keys).

    A TGrow weight with more output channels than the layer needs (a checkpoint trained with more temporal
    upsampling there) is accepted and its last channels are used: the ones that make the latest frame."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tgrow = {f"decoder.{i}.conv.weight" for i, m in enumerate(model.decoder) if isinstance(m, TGrow)}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched, out = [], {}
    for k in sorted(set(sd) & set(expected)):
        got, want = tuple(sd[k].shape), expected[k]
        if got != want and k in tgrow and len(got) == 4 and got[1:] == want[1:] and got[0] > want[0] \
                and got[0] % want[1] == 0:
            out[k] = sd[k][-want[0]:]
        elif got != want:
            mismatched.append(f"{k} {got} (expected {want})")
        else:
            out[k] = sd[k]
    if missing or unexpected or mismatched:
        parts = [f"{name} ({len(v)}): {', '.join(v[:5])}{', ...' if len(v) > 5 else ''}"
                 for name, v in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", mismatched)) if v]
        raise CheckpointError(f"{path}: not a TAEHV Wan2.1 checkpoint - " + " | ".join(parts))
    return out
