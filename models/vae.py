"""Wan2.1 video VAE (diffusers ``AutoencoderKLWan``) with a streaming decoder for block-by-block generation.

The Wan VAE is causal in time: each latent frame is decoded on its own while every causal 3-D convolution keeps
the last two input frames of its previous call in a feature cache (diffusers' ``feat_cache`` / ``feat_idx``).
diffusers keeps that cache on the module and clears it at the end of every ``decode``; here every stream owns
its cache (``VAEStream``), so a session decodes each finished block as it comes, many sessions can interleave
on one VAE, and the frames equal one full decode of the whole video. The first latent frame gives 1 pixel
frame, every later one 4, so n latent frames give 1 + 4 (n - 1) pixel frames.

Latents outside this module are normalised as the Wan pipelines do: z_norm = (z - latents_mean) / latents_std,
in the engine layout [B, F, C, h, w]; the VAE itself works on raw latents in [B, C, F, h, w].

Weights: a diffusers VAE directory (``from_pretrained``), the original ``Wan2.1_VAE.pth`` (``from_original``,
names mapped to diffusers'), or the ``tiny()`` preset with seeded random weights for tests.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .tensor_files import CheckpointError, read_tensor_file

__all__ = ["WanVAE", "VAEStream", "original_to_diffusers_vae_keys", "TINY_VAE_CONFIG", "WAN21_VAE_CONFIG"]

TINY_VAE_CONFIG = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                       temperal_downsample=[False, True, True])
# The released Wan2.1 VAE (diffusers' AutoencoderKLWan defaults).
WAN21_VAE_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                        temperal_downsample=[False, True, True])


@dataclass
class VAEStream:
    """Decoder state of one video: the causal-conv feature cache and how far the stream has got."""
    feat_cache: list
    latent_frames: int = 0  # latent frames decoded so far
    pixel_frames: int = 0  # pixel frames returned so far


# ---------------------------------------------------------------------------------------------------
# original Wan VAE names <-> diffusers names
# ---------------------------------------------------------------------------------------------------
# Inside a residual block the original code uses one nn.Sequential (norm, act, conv, norm, act, dropout, conv).
_RES_RENAMES = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                "conv_shortcut": "shortcut"}
_TOP_VAE = {"quant_conv": "conv1", "post_quant_conv": "conv2"}


def _res_inner(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RES_RENAMES[head]}.{tail}" if head in _RES_RENAMES else rest


def _diffusers_to_original_vae_key(key: str, cfg: dict) -> str:
    """Our structural map for the non-residual (Wan2.1) VAE; the inverse is what ``from_original`` uses."""
    top, _, rest = key.partition(".")
    if top in _TOP_VAE:
        return f"{_TOP_VAE[top]}.{rest}"
    part, _, rest = rest.partition(".")
    if part == "conv_in":
        return f"{top}.conv1.{rest}"
    if part == "norm_out":
        return f"{top}.head.0.{rest}"
    if part == "conv_out":
        return f"{top}.head.2.{rest}"
    if part == "mid_block":  # middle = (res, attn, res)
        kind, i, inner = rest.split(".", 2)
        slot = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(kind, i)]
        return f"{top}.middle.{slot}.{_res_inner(inner) if kind == 'resnets' else inner}"
    if top == "encoder" and part == "down_blocks":  # same flat list in both
        n, inner = rest.split(".", 1)
        return f"encoder.downsamples.{n}.{_res_inner(inner)}"
    if top == "decoder" and part == "up_blocks":  # diffusers groups the flat list per resolution stage
        stage, kind, rest2 = rest.split(".", 2)
        stage = int(stage)
        per_stage = cfg["num_res_blocks"] + 1
        n_stages = len(cfg["dim_mult"])
        start = sum(per_stage + (1 if s != n_stages - 1 else 0) for s in range(stage))
        j, inner = rest2.split(".", 1)
        if kind == "resnets":
            return f"decoder.upsamples.{start + int(j)}.{_res_inner(inner)}"
        if kind == "upsamplers":
            return f"decoder.upsamples.{start + per_stage}.{inner}"
    raise KeyError(f"no original Wan VAE name known for {key}")


def original_to_diffusers_vae_keys(diffusers_keys, cfg: dict) -> dict:
    """{original Wan VAE key: diffusers key} for every key of a diffusers AutoencoderKLWan built from cfg."""
    if cfg.get("is_residual") or cfg.get("patch_size"):
        raise CheckpointError("the original-name mapping covers the Wan2.1 VAE only (not is_residual / patch_size)")
    return {_diffusers_to_original_vae_key(k, cfg): k for k in diffusers_keys}


def _build_config(config: dict | None) -> dict:
    from diffusers import AutoencoderKLWan
    import inspect
    cfg = dict(WAN21_VAE_CONFIG)
    if config:
        allowed = set(inspect.signature(AutoencoderKLWan.__init__).parameters) - {"self"}
        bad = sorted(set(config) - allowed)
        if bad:
            raise ValueError(f"unknown AutoencoderKLWan config keys {bad}; known: {sorted(allowed)}")
        cfg.update(config)
    return cfg


# ---------------------------------------------------------------------------------------------------
# the wrapper
# ---------------------------------------------------------------------------------------------------
def video_to_encode(frames, temporal_ratio: int, spatial_ratio: int) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] checked for a video encoder (T = 1 + temporal_ratio*k, H and W multiples of
    spatial_ratio), as a tensor."""
    x = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8, got {x.dtype}")
    T, H, W, _ = x.shape
    r, s = temporal_ratio, spatial_ratio
    if T == 0:
        raise ValueError("no frames to encode (T = 0)")
    if (T - 1) % r:
        raise ValueError(f"frame count {T} is not 1 + {r}k; trim to {1 + (T - 1) // r * r} frames")
    if H % s or W % s:
        raise ValueError(f"frame size {H}x{W} must be a multiple of {s}")
    return x


class CausalFrameCounts:
    """Frame arithmetic of a causal video VAE (Wan's, TAEHV): the first latent frame is one pixel frame, every
    later one ``temporal_ratio``."""
    temporal_ratio = 4

    def pixel_frames(self, n_latent: int) -> int:
        """Pixel frames decoded from n latent frames: the first gives 1, every later one temporal_ratio."""
        if n_latent < 0:
            raise ValueError(f"latent frame count must be >= 0, got {n_latent}")
        return 0 if n_latent == 0 else 1 + self.temporal_ratio * (n_latent - 1)

    def latent_frames(self, n_pixel: int) -> int:
        """Latent frames that encode n pixel frames (n = 1 + 4k; other counts round down to that)."""
        if n_pixel < 1:
            raise ValueError(f"pixel frame count must be >= 1, got {n_pixel}")
        return 1 + (n_pixel - 1) // self.temporal_ratio


class WanVAE(CausalFrameCounts, nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model.eval()
        c = model.config
        # plain float32 tensors, not buffers: module.to(bfloat16) must not round the normalisation constants
        self.latents_mean = torch.tensor(c.latents_mean, dtype=torch.float32)
        self.latents_std = torch.tensor(c.latents_std, dtype=torch.float32)
        if self.latents_mean.numel() != c.z_dim or self.latents_std.numel() != c.z_dim:
            raise ValueError(f"latents_mean/std have {self.latents_mean.numel()}/{self.latents_std.numel()} "
                             f"entries, the VAE has z_dim={c.z_dim}")
        self._conv_count = sum(type(m).__name__ == "WanCausalConv3d" for m in model.decoder.modules())

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device="cpu", dtype: torch.dtype = torch.float32) -> "WanVAE":
        """A diffusers AutoencoderKLWan directory (or a pipeline directory with vae/), read offline."""
        from diffusers import AutoencoderKLWan
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"VAE directory not found: {path}")
        if not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
            path = path / "vae"
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path}: no config.json of a diffusers AutoencoderKLWan")
        model = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
        return cls(model).to(device)

    @classmethod
    def from_original(cls, path: str | os.PathLike, *, config: dict | None = None, device="cpu",
                      dtype: torch.dtype = torch.float32) -> "WanVAE":
        """The original ``Wan2.1_VAE.pth`` state dict (or a file with diffusers names); config defaults to Wan2.1's."""
        from diffusers import AutoencoderKLWan
        path = Path(path)
        obj, _ = read_tensor_file(path)
        for key in ("state_dict", "model", "vae"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
        bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{path}: the VAE state dict holds non-tensor values, refused: {bad[:20]}")
        cfg = _build_config(config)
        with torch.device("meta"):
            model = AutoencoderKLWan(**cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if any(k.startswith(("decoder.up_blocks.", "post_quant_conv.")) for k in obj):
            sd = dict(obj)  # already diffusers names
        else:
            names = original_to_diffusers_vae_keys(expected, cfg)
            sd = {names.get(k, k): v for k, v in obj.items()}
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        mismatched = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
                            for k in set(sd) & set(expected) if tuple(sd[k].shape) != expected[k])
        if missing or unexpected or mismatched:
            found = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
            parts = [f"{n} ({len(v)}): {', '.join(v)}" for n, v in found if v]
            raise CheckpointError(f"{path}: VAE state dict does not fit the config - " + " | ".join(parts))
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
        model.clear_cache()  # diffusers allocates its own cache lists lazily; ours are per stream
        return cls(model).to(device)

    @classmethod
    def load(cls, path: str | os.PathLike, **kw) -> "WanVAE":
        """A diffusers directory or an original weights file, whichever ``path`` is."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"VAE checkpoint not found: {path}")
        return cls.from_pretrained(path, **kw) if path.is_dir() else cls.from_original(path, **kw)

    @classmethod
    def tiny(cls, seed: int = 0, *, device="cpu", dtype: torch.dtype = torch.float32) -> "WanVAE":
        """A tiny Wan2.1-structured VAE with seeded random weights (same strides: 4 in time, 8 in space)."""
        from diffusers import AutoencoderKLWan
        with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG stream untouched
            torch.manual_seed(seed)
            model = AutoencoderKLWan(**TINY_VAE_CONFIG)
        return cls(model).to(device=device, dtype=dtype)

    # ---- properties the engine needs -----------------------------------------------------------
    @property
    def temporal_ratio(self) -> int:
        return int(self.model.config.scale_factor_temporal or 4)

    @property
    def spatial_ratio(self) -> int:
        return int(self.model.config.scale_factor_spatial or 8)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.z_dim)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- normalisation ---------------------------------------------------------------------------
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents [B, C, F, h, w] -> engine latents [B, F, C, h, w], (z - mean) / std per channel."""
        m = self.latents_mean.to(z.device).view(1, -1, 1, 1, 1)
        s = self.latents_std.to(z.device).view(1, -1, 1, 1, 1)
        return ((z.float() - m) / s).permute(0, 2, 1, 3, 4)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Engine latents [B, F, C, h, w] -> raw latents [B, C, F, h, w] in the VAE's dtype."""
        self._check_latents(latents)
        z = latents.to(self.device).float().permute(0, 2, 1, 3, 4)  # [B, C, F, h, w]
        z = z * self.latents_std.to(z.device).view(1, -1, 1, 1, 1) + self.latents_mean.to(z.device).view(1, -1, 1, 1, 1)
        return z.to(self.dtype)

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.dim() != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"latents must be [B, F, {self.latent_channels}, h, w], got {tuple(latents.shape)}")

    @staticmethod
    def to_uint8(video: torch.Tensor) -> np.ndarray:
        """[1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] (rounded, not truncated)."""
        v = ((video[0].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        return v.permute(1, 2, 3, 0).contiguous().cpu().numpy()

    # ---- decoding --------------------------------------------------------------------------------
    def new_stream(self) -> VAEStream:
        return VAEStream(feat_cache=[None] * self._conv_count)

    @torch.no_grad()
    def decode_block(self, state: VAEStream, latents: torch.Tensor) -> np.ndarray:
        """Decode the next latent frames of a stream: latents [1, F, C, h, w] (normalised) -> uint8 [T, H, W, 3].

        T = 1 + 4 (F - 1) for the stream's first block and 4 F afterwards.
        """
        if not isinstance(state, VAEStream):
            raise TypeError(f"state must be a VAEStream from new_stream(), got {type(state).__name__}")
        self._check_latents(latents)
        if latents.shape[0] != 1:
            raise ValueError(f"a stream decodes one video: latents batch must be 1, got {latents.shape[0]}")
        if latents.shape[1] == 0:
            return np.zeros((0, latents.shape[3] * self.spatial_ratio, latents.shape[4] * self.spatial_ratio, 3),
                            dtype=np.uint8)
        x = self.model.post_quant_conv(self.denormalize(latents))  # 1x1x1 conv: per frame, no cache needed
        outs = []
        for i in range(x.shape[2]):
            # one latent frame per call, exactly as diffusers' full decode loops, but on this stream's cache
            outs.append(self.model.decoder(x[:, :, i:i + 1], feat_cache=state.feat_cache, feat_idx=[0],
                                           first_chunk=state.latent_frames == 0))
            state.latent_frames += 1
        video = torch.cat(outs, dim=2)  # [1, 3, T, H, W]
        if self.model.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
            video = unpatchify(video, patch_size=self.model.config.patch_size)
        frames = self.to_uint8(video)
        state.pixel_frames += frames.shape[0]
        return frames

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """One full decode of a whole clip (diffusers' own loop): latents [1, F, C, h, w] -> uint8 [T, H, W, 3]."""
        self._check_latents(latents)
        if latents.shape[0] != 1:
            raise ValueError(f"decode takes one video: latents batch must be 1, got {latents.shape[0]}")
        return self.to_uint8(self.model.decode(self.denormalize(latents)).sample)

    # ---- encoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, frames) -> torch.Tensor:
        """uint8 frames [T, H, W, 3] (T = 1 + 4k, H and W multiples of 8) -> normalised latents [1, F, C, h, w].

        Uses the posterior mean, as the Wan pipelines do when they encode conditioning frames.
        """
        x = video_to_encode(frames, self.temporal_ratio, self.spatial_ratio)
        return self._encode(x.to(self.device).float() / 127.5 - 1.0)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        """float frames [T, H, W, 3] in [-1, 1] -> normalised latents [1, F, C, h, w] (posterior mean)."""
        z = self.model.encode(video.permute(3, 0, 1, 2)[None].to(self.dtype)).latent_dist.mode()  # [1, C, F, h, w]
        return self.normalize(z)

    @torch.no_grad()
    def encode_start_image(self, image, latent_frames: int) -> torch.Tensor:
        """The latents [1, latent_frames, C, h, w] of a video made of the uint8 image [H, W, 3] followed by frames
        of exact zeros in [-1, 1] (mid-gray), as image-to-video models condition every frame on their start image."""
        x = video_to_encode(np.asarray(image)[None], self.temporal_ratio, self.spatial_ratio)
        video = torch.zeros(self.pixel_frames(latent_frames), *x.shape[1:], device=self.device)
        video[0] = x[0].to(self.device).float() / 127.5 - 1.0
        return self._encode(video)
