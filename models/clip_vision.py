"""CLIP ViT image encoder: a start image -> the image tokens of an image-to-video Wan DiT (Matrix-Game 2.0, Wan2.1-I2V).

These models condition their DiT on the *penultimate-layer* tokens of the CLIP ViT-H/14 vision tower of
open-clip-xlm-roberta-large-vit-huge-14: the hidden states after the first ``layers - 1`` transformer blocks,
without any final LayerNorm or projection, i.e. [B, 1 + (S/p)^2, dim] = [B, 257, 1280] at 224x224. This equals
Wan's ``CLIPModel.visual(..., use_31_block=True)`` and transformers'
``CLIPVisionModel(pixel_values, output_hidden_states=True).hidden_states[-2]``. The last block and the post
LayerNorm are read and checked when loading but never built or run.

The architecture is a pre-norm ViT: patch convolution (no bias), a class token, absolute position embeddings,
a LayerNorm before the blocks, then blocks of ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with a fused qkv
projection and an MLP of fc1 -> activation -> fc2. LayerNorms run in float32 (as Wan's do), the rest in the
weights' dtype.

Weights load from two layouts (``CLIPVisionEncoder.load``):

- Wan's release file ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``: the state dict of the whole
  ``XLMRobertaCLIP``; the vision tower is ``visual.*`` (``patch_embedding``, ``cls_embedding`` [1, 1, dim],
  ``pos_embedding`` [1, T, dim], ``pre_norm``, ``transformer.N.{norm1, attn.to_qkv, attn.proj, norm2, mlp.0,
  mlp.2}``, ``post_norm``, ``head``); the text tower ``textual.*`` and ``log_scale`` are ignored. This release
  uses exact (erf) GELU and LayerNorm eps 1e-5; the architecture comes from a preset (ViT-H/14) and is checked
  against the tensor shapes. A ``.safetensors`` file with the same keys loads too.
- A transformers ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel`` folder (``config.json``
  + weights), such as the ``image_encoder/`` of a diffusers Wan I2V pipeline. Keys are ``vision_model.*`` (the
  text tower and projections of a ``CLIPModel`` are ignored), or the same names without that prefix (as
  transformers 5 saves a ``CLIPVisionModel``). ``hidden_act`` and ``layer_norm_eps`` come from ``config.json``.

Either way every vision key is checked: a missing or unexpected key, or a wrong shape, is a ``CheckpointError``
(a ``ValueError``) naming the file and the first offending keys. Files are read with
``torch.load(weights_only=True)`` or safetensors only.

Image preprocessing (``encode_image``) follows Wan / Matrix-Game: the frame is resized to image_size x image_size
with bicubic interpolation (``align_corners=False``, no antialiasing, no clamping, aspect ratio not kept; they
call ``F.interpolate(..., mode="bicubic")`` on the [-1, 1] frame), scaled to [0, 1] and normalized with the CLIP
mean/std. Resizing [0, 1] values instead of [-1, 1] ones gives the same result, as bicubic interpolation commutes
with an affine map of the values. Note that diffusers' Wan I2V pipeline preprocesses differently (its
CLIPImageProcessor resizes the short side and center-crops); this module reproduces the original release.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigBase, read_json_object
from .tensor_files import CheckpointError, read_tensor_file

__all__ = ["CLIPVisionConfig", "CLIPVisionEncoder", "PRESETS", "WAN_CLIP_FILENAME"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# the name of the CLIP file in the Wan2.1 / Matrix-Game 2.0 release folders
WAN_CLIP_FILENAME = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"

_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact (erf) GELU: Wan's nn.GELU(), transformers' "gelu"
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class CLIPVisionConfig(ConfigBase):
    """Architecture of the vision tower. ``layers`` counts all blocks of the checkpoint; the encoder builds and
    runs ``layers - 1`` of them (penultimate-layer tokens)."""
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_dim: int = 5120
    heads: int = 16
    layers: int = 32
    eps: float = 1e-5
    act: str = "gelu"
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def __post_init__(self) -> None:
        for k in ("image_size", "patch_size", "dim", "mlp_dim", "heads", "layers"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ValueError(f"CLIPVisionConfig: {k} must be a positive int, got {getattr(self, k)!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"CLIPVisionConfig: dim {self.dim} is not a multiple of heads {self.heads}")
        if self.act not in _ACTS:
            raise ValueError(f"CLIPVisionConfig: act {self.act!r} is not one of {sorted(_ACTS)}")
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("CLIPVisionConfig: mean and std must have 3 values (RGB)")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image: the class token and one per patch."""
        return 1 + self.grid ** 2


PRESETS: dict[str, CLIPVisionConfig] = {
    # open-clip-xlm-roberta-large-vit-huge-14 vision tower (Wan2.1-I2V, Matrix-Game 2.0)
    "vit-h-14": CLIPVisionConfig(),
    # a tiny tower for tests and benchmarks: 1 + 2x2 tokens of width 32
    "tiny": CLIPVisionConfig(image_size=28, patch_size=14, dim=32, mlp_dim=128, heads=2, layers=3),
}


def _resolve_config(config: CLIPVisionConfig | str | dict) -> CLIPVisionConfig:
    if isinstance(config, CLIPVisionConfig):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown CLIP vision preset {config!r}; known: {sorted(PRESETS)}")
        return PRESETS[config]
    if isinstance(config, dict):
        return CLIPVisionConfig.from_dict(config, what="CLIP vision config")
    raise TypeError(f"config must be a CLIPVisionConfig, a preset name or a dict, got {type(config).__name__}")


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm computed in float32, result in the input's dtype."""
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(),
                        norm.eps).to(x.dtype)


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.act = _ACTS[cfg.act]
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)  # rows: all of q, then k, then v; each head-major
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(_layer_norm(x, self.norm1)).view(b, n, 3, self.heads, c // self.heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]; scale head_dim ** -0.5
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(self.act(self.fc1(_layer_norm(x, self.norm2))))


class CLIPVisionEncoder(nn.Module):
    """CLIP ViT vision tower up to its penultimate block: normalized pixels -> tokens [B, 1 + (S/p)^2, dim].

    Build with ``CLIPVisionEncoder.load(path)`` (real weights) or ``CLIPVisionEncoder.random(preset)`` (tests,
    benchmarks); the constructor makes randomly initialized weights of ``config``.
    """

    def __init__(self, config: CLIPVisionConfig | str = "vit-h-14"):
        super().__init__()
        cfg = self.config = _resolve_config(config)
        self.patch_embed = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.randn(cfg.dim) * cfg.dim ** -0.5)
        self.pos_embed = nn.Parameter(torch.randn(cfg.num_tokens, cfg.dim) * cfg.dim ** -0.5)
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers - 1))

    # ---------------------------------------------------------------------------------------------
    # running
    # ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalized images [B, 3, S, S] (S = config.image_size) -> penultimate tokens [B, 1 + (S/p)^2, dim]
        in the weights' dtype."""
        cfg = self.config
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values must be [B, 3, {cfg.image_size}, {cfg.image_size}], got "
                             f"{list(pixel_values.shape)}")
        x = self.patch_embed(pixel_values.to(device=self.device, dtype=self.dtype))  # [B, dim, g, g]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.view(1, 1, -1).expand(x.shape[0], 1, -1), x], dim=1) + self.pos_embed
        x = _layer_norm(x, self.pre_norm)
        for block in self.blocks:
            x = block(x)
        return x

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB images [H, W, 3] or [B, H, W, 3] -> normalized float32 pixels [B, 3, S, S] on the encoder's
        device: bicubic resize to S x S (align_corners=False, no antialias, as Wan does), then CLIP mean/std."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.array(images, copy=True))  # a writable copy (read-only arrays warn)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a numpy array or a torch tensor, got {type(images).__name__}")
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 RGB, got dtype {images.dtype}")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape:
            raise ValueError(f"images must be [H, W, 3] or [B, H, W, 3] uint8, got shape {list(images.shape)}")
        x = images.to(self.device).permute(0, 3, 1, 2).float() / 255.0
        size = self.config.image_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        mean = torch.tensor(self.config.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_image(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB images [H, W, 3] or [B, H, W, 3] (any size) -> float32 tokens [B, 1 + (S/p)^2, dim]."""
        return self(self.preprocess(images)).float()

    # ---------------------------------------------------------------------------------------------
    # building
    # ---------------------------------------------------------------------------------------------
    @classmethod
    def random(cls, preset: CLIPVisionConfig | str = "tiny", seed: int = 0, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> CLIPVisionEncoder:
        """Seeded random weights (LayerNorm scales and biases perturbed too), in eval mode without gradients."""
        cfg = _resolve_config(preset)
        gen = torch.Generator().manual_seed(seed)
        with torch.device("meta"):
            model = cls(cfg)
        sd = {}
        for name, p in model.state_dict().items():
            if name.endswith("weight") and p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                sd[name] = torch.randn(p.shape, generator=gen) * fan_in ** -0.5
            elif "norm" in name and name.endswith("weight"):
                sd[name] = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith("bias"):
                sd[name] = 0.02 * torch.randn(p.shape, generator=gen)
            else:  # class token, position embeddings
                sd[name] = torch.randn(p.shape, generator=gen) * cfg.dim ** -0.5
        model.load_state_dict(sd, assign=True)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             config: CLIPVisionConfig | str | None = None) -> CLIPVisionEncoder:
        """Load a vision tower, in eval mode without gradients. ``path`` may be:

        - Wan's ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (or a ``.safetensors`` with its keys),
          or a folder holding that file; its architecture is ``config`` (default the "vit-h-14" preset), checked
          against the tensor shapes;
        - a transformers CLIP folder (``config.json`` of a CLIPVisionModel, CLIPVisionModelWithProjection or
          CLIPModel plus ``model.safetensors`` / ``pytorch_model.bin``, sharded or not), one of its weight files,
          or a diffusers pipeline folder with such an ``image_encoder/``. ``config.json`` gives the architecture;
          a ``config`` given too must agree with it.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"CLIP vision checkpoint not found: {path}")
        if path.is_dir():
            return cls._load_dir(path, device=device, dtype=dtype, config=config)
        if path.name == "config.json":
            return cls._load_dir(path.parent, device=device, dtype=dtype, config=config)
        sd, _ = read_tensor_file(path)
        _check_flat(sd, path)
        if any(k.startswith("visual.") for k in sd):
            cfg = _resolve_config("vit-h-14" if config is None else config)
            return cls._build(_from_wan(sd, cfg, path), cfg, device, dtype)
        if _hf_prefix(sd) is not None:
            if not (path.parent / "config.json").is_file():
                raise CheckpointError(f"{path}: transformers CLIP vision weights need their config.json beside them "
                                      f"(not found in {path.parent})")
            cfg = _config_from_hf_dir(path.parent, config)
            return cls._build(_from_hf(sd, cfg, path), cfg, device, dtype)
        raise CheckpointError(f"{path}: not a CLIP vision checkpoint: no 'visual.*' (Wan XLMRobertaCLIP) or "
                              f"'vision_model.*' (transformers CLIP) keys; first keys: {sorted(sd)[:5]}")

    @classmethod
    def _load_dir(cls, d: Path, *, device, dtype, config) -> CLIPVisionEncoder:
        if (d / "config.json").is_file():
            cfg = _config_from_hf_dir(d, config)
            weights = _hf_weights_file(d)
            sd = _read_hf_weights(weights)
            return cls._build(_from_hf(sd, cfg, weights), cfg, device, dtype)
        if (d / "image_encoder" / "config.json").is_file():
            return cls._load_dir(d / "image_encoder", device=device, dtype=dtype, config=config)
        if (d / WAN_CLIP_FILENAME).is_file():
            return cls.load(d / WAN_CLIP_FILENAME, device=device, dtype=dtype, config=config)
        raise CheckpointError(f"{d}: no CLIP vision model found (expected config.json with weights, an "
                              f"image_encoder/ folder, or {WAN_CLIP_FILENAME}); folder holds "
                              f"{sorted(p.name for p in d.iterdir())[:10]}")

    @classmethod
    def _build(cls, sd: dict[str, torch.Tensor], cfg: CLIPVisionConfig, device, dtype) -> CLIPVisionEncoder:
        """Build on the meta device and assign the (already checked) tensors: no random init, no extra copy."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
        return model.eval().requires_grad_(False)


# -------------------------------------------------------------------------------------------------
# checkpoint layouts
# -------------------------------------------------------------------------------------------------
def _check_flat(sd: dict, source) -> None:
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: expected a flat state dict of tensors; non-tensor entries: {bad[:5]}")


def _keys_line(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _check_keys(present: dict[str, torch.Tensor], expected: dict[str, tuple | None], optional: set[str],
                source, prefix: str) -> None:
    """present: the checkpoint's vision keys with ``prefix`` taken off; expected: required key -> shape (None:
    any); optional: keys read and ignored. Missing, unexpected and mis-shaped keys raise one CheckpointError that
    names the first few as the file spells them."""
    missing = sorted(prefix + k for k in set(expected) - set(present))
    unexpected = sorted(prefix + k for k in set(present) - set(expected) - optional)
    parts = []
    if missing:
        parts.append(f"missing keys: {_keys_line(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_keys_line(unexpected)}")
    if parts:
        raise CheckpointError(f"{source}: the CLIP vision tower does not fit its config - " + "; ".join(parts))
    wrong = [f"{prefix}{k} {tuple(present[k].shape)} (expected {s})" for k, s in expected.items()
             if s is not None and tuple(present[k].shape) != s]
    if wrong:
        raise CheckpointError(f"{source}: the CLIP vision tower does not fit its config - shape mismatches: "
                              f"{_keys_line(wrong, 3)}")


def _check_arch(found: dict, cfg: CLIPVisionConfig, source, what: str) -> None:
    diff = [f"{k}={v} (config: {getattr(cfg, k)})" for k, v in found.items() if v != getattr(cfg, k)]
    if diff:
        raise CheckpointError(f"{source}: the checkpoint's vision tower does not match {what}: {', '.join(diff)}")


def _block_indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _from_wan(sd: dict[str, torch.Tensor], cfg: CLIPVisionConfig, source) -> dict[str, torch.Tensor]:
    """Wan XLMRobertaCLIP state dict -> this module's state dict (checked against cfg)."""
    outside = sorted(k for k in sd if not k.startswith(("visual.", "textual.")) and k != "log_scale")
    if outside:
        raise CheckpointError(f"{source}: unexpected keys outside visual.* / textual.*: {_keys_line(outside)}")
    vis = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    for k in ("patch_embedding.weight", "pos_embedding"):
        if k not in vis:
            raise CheckpointError(f"{source}: missing key visual.{k}")
    pw, pos = vis["patch_embedding.weight"], vis["pos_embedding"]
    blocks = _block_indices(vis, r"transformer\.(\d+)\.")
    grid = math.isqrt(max(pos.shape[-2] - 1, 0)) if pos.ndim == 3 else -1
    found = {"dim": pw.shape[0], "patch_size": pw.shape[-1], "image_size": grid * pw.shape[-1],
             "layers": blocks[-1] + 1 if blocks else 0}
    if "transformer.0.mlp.0.weight" in vis:
        found["mlp_dim"] = vis["transformer.0.mlp.0.weight"].shape[0]
    _check_arch(found, cfg, source, "the CLIP vision config")

    d, m, t = cfg.dim, cfg.mlp_dim, cfg.num_tokens
    expected: dict[str, tuple | None] = {
        "patch_embedding.weight": (d, 3, cfg.patch_size, cfg.patch_size), "cls_embedding": (1, 1, d),
        "pos_embedding": (1, t, d), "pre_norm.weight": (d,), "pre_norm.bias": (d,)}
    for i in range(cfg.layers):
        p = f"transformer.{i}."
        expected.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "norm2.weight": (d,),
                         p + "norm2.bias": (d,), p + "attn.to_qkv.weight": (3 * d, d), p + "attn.to_qkv.bias": (3 * d,),
                         p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,), p + "mlp.0.weight": (m, d),
                         p + "mlp.0.bias": (m,), p + "mlp.2.weight": (d, m), p + "mlp.2.bias": (d,)})
    optional = {"post_norm.weight", "post_norm.bias", "head"}  # unused by the penultimate tokens
    _check_keys(vis, expected, optional, source, "visual.")

    out = {"patch_embed.weight": vis["patch_embedding.weight"], "cls_token": vis["cls_embedding"].reshape(d),
           "pos_embed": vis["pos_embedding"].reshape(t, d), "pre_norm.weight": vis["pre_norm.weight"],
           "pre_norm.bias": vis["pre_norm.bias"]}
    names = {"norm1": "norm1", "qkv": "attn.to_qkv", "proj": "attn.proj", "norm2": "norm2", "fc1": "mlp.0",
             "fc2": "mlp.2"}
    for i in range(cfg.layers - 1):
        for ours, theirs in names.items():
            for wb in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{wb}"] = vis[f"transformer.{i}.{theirs}.{wb}"]
    return out


_HF_IGNORED_PREFIXES = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")


def _hf_prefix(sd: dict) -> str | None:
    """'vision_model.' or '' (a transformers 5 CLIPVisionModel), or None when sd is no transformers CLIP model."""
    if any(k.startswith("vision_model.") for k in sd):
        return "vision_model."
    if "embeddings.patch_embedding.weight" in sd:
        return ""
    return None


def _from_hf(sd: dict[str, torch.Tensor], cfg: CLIPVisionConfig, source) -> dict[str, torch.Tensor]:
    """transformers CLIP state dict -> this module's state dict (checked against cfg)."""
    prefix = _hf_prefix(sd)
    if prefix is None:
        raise CheckpointError(f"{source}: not a transformers CLIP vision model: no 'vision_model.*' keys; first "
                              f"keys: {sorted(sd)[:5]}")
    if prefix:
        outside = sorted(k for k in sd if not k.startswith((prefix,) + _HF_IGNORED_PREFIXES))
        if outside:
            raise CheckpointError(f"{source}: unexpected keys beside vision_model.*: {_keys_line(outside)}")
        vis = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    else:  # no prefix: everything is the vision tower, except a CLIPVisionModelWithProjection's projection
        vis = {k: v for k, v in sd.items() if not k.startswith("visual_projection.")}

    d, m, t, p_ = cfg.dim, cfg.mlp_dim, cfg.num_tokens, cfg.patch_size
    expected: dict[str, tuple | None] = {
        "embeddings.patch_embedding.weight": (d, 3, p_, p_), "embeddings.class_embedding": (d,),
        "embeddings.position_embedding.weight": (t, d), "pre_layrnorm.weight": (d,), "pre_layrnorm.bias": (d,)}
    for i in range(cfg.layers):
        p = f"encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            expected.update({f"{p}self_attn.{n}.weight": (d, d), f"{p}self_attn.{n}.bias": (d,)})
        expected.update({p + "layer_norm1.weight": (d,), p + "layer_norm1.bias": (d,), p + "layer_norm2.weight": (d,),
                         p + "layer_norm2.bias": (d,), p + "mlp.fc1.weight": (m, d), p + "mlp.fc1.bias": (m,),
                         p + "mlp.fc2.weight": (d, m), p + "mlp.fc2.bias": (d,)})
    # unused by the penultimate tokens; position_ids was a saved buffer in older transformers
    optional = {"post_layernorm.weight", "post_layernorm.bias", "embeddings.position_ids"}
    _check_keys(vis, expected, optional, source, prefix)

    out = {"patch_embed.weight": vis["embeddings.patch_embedding.weight"],
           "cls_token": vis["embeddings.class_embedding"], "pos_embed": vis["embeddings.position_embedding.weight"],
           "pre_norm.weight": vis["pre_layrnorm.weight"], "pre_norm.bias": vis["pre_layrnorm.bias"]}
    names = {"norm1": "layer_norm1", "proj": "self_attn.out_proj", "norm2": "layer_norm2", "fc1": "mlp.fc1",
             "fc2": "mlp.fc2"}
    for i in range(cfg.layers - 1):
        p = f"encoder.layers.{i}."
        for ours, theirs in names.items():
            for wb in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{wb}"] = vis[f"{p}{theirs}.{wb}"]
        for wb in ("weight", "bias"):
            out[f"blocks.{i}.qkv.{wb}"] = torch.cat([vis[f"{p}self_attn.{n}.{wb}"]
                                                      for n in ("q_proj", "k_proj", "v_proj")])
    return out


# transformers' CLIPVisionConfig defaults, for fields a config.json leaves out
_HF_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                "num_channels": 3}


def _config_from_hf_dir(d: Path, config: CLIPVisionConfig | str | None) -> CLIPVisionConfig:
    """CLIPVisionConfig of a transformers CLIP folder (mean/std from a preprocessor_config.json there or in a
    sibling image_processor/ folder, else CLIP's)."""
    path = d / "config.json"
    obj = read_json_object(path, error=CheckpointError)
    kind = obj.get("model_type")
    if kind == "clip":
        obj = obj.get("vision_config") or {}
    elif kind != "clip_vision_model":
        raise CheckpointError(f"{path}: not a CLIP vision config (model_type {kind!r}, expected 'clip_vision_model' "
                              "or 'clip')")
    v = {k: obj.get(k, dflt) for k, dflt in _HF_DEFAULTS.items()}
    if v["num_channels"] != 3:
        raise CheckpointError(f"{path}: num_channels {v['num_channels']} is not supported (RGB only)")
    if v["hidden_act"] not in _ACTS:
        raise CheckpointError(f"{path}: hidden_act {v['hidden_act']!r} is not supported ({sorted(_ACTS)})")
    mean, std = CLIP_MEAN, CLIP_STD
    for pre in (d / "preprocessor_config.json", d.parent / "image_processor" / "preprocessor_config.json"):
        if pre.is_file():
            p = read_json_object(pre, error=CheckpointError)
            mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
            break
    try:
        cfg = CLIPVisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], dim=v["hidden_size"],
                               mlp_dim=v["intermediate_size"], heads=v["num_attention_heads"],
                               layers=v["num_hidden_layers"], eps=float(v["layer_norm_eps"]), act=v["hidden_act"],
                               mean=mean, std=std)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    if config is not None:
        want = _resolve_config(config)
        diff = [f"{f.name}={getattr(cfg, f.name)} (asked: {getattr(want, f.name)})"
                for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(want, f.name)]
        if diff:
            raise CheckpointError(f"{path}: the folder's config differs from the config asked for: {', '.join(diff)}")
    return cfg


def _hf_weights_file(d: Path) -> Path:
    for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin"):
        if (d / name).is_file():
            return d / name
    raise CheckpointError(f"{d}: no weights beside config.json (expected model.safetensors or pytorch_model.bin, "
                          f"maybe sharded); folder holds {sorted(p.name for p in d.iterdir())[:10]}")


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.name.endswith(".index.json"):
        sd, _ = read_tensor_file(path)
        _check_flat(sd, path)
        return sd
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a shard index with a 'weight_map' ({type(e).__name__}: {e})") from None
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part, _ = read_tensor_file(path.parent / shard)
        _check_flat(part, path.parent / shard)
        sd.update(part)
    return sd
