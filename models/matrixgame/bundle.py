"""Matrix-Game 2.0 bundles: the released checkpoints, and presets with random weights.

Presets (``load_model`` names):
- ``matrix-game-2.0`` (universal: keyboard 4 + mouse 2), ``matrix-game-2.0-gta`` (gta_drive: keyboard 2 + mouse
  2, window 4) and ``matrix-game-2.0-templerun`` (keyboard 7, no mouse, 4 steps): the released shapes (30 layers
  of dim 1536, action modules in layers 0-14, CLIP ViT-H/14 tokens, the Wan2.1 VAE, 352x640) with seeded random
  weights, for benchmarks;
- ``matrix-game-tiny``: a tiny model of the same structure (tiny DiT, tiny Wan VAE, tiny CLIP), 64x64, for tests
  and demos on a laptop.

A released model is a folder (``load_release``) holding the release's ``config.json`` (the ``CausalWanModel``
keyword arguments, with its ``action_config``) and one ``*.safetensors`` of ``model.``-prefixed keys; the VAE
``Wan2.1_VAE.pth`` and the CLIP ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` are looked for in
that folder and its parent (the release's layout), or given as paths. The variant follows from the action
config (keyboard width and mouse) and sets the sampling steps and the window.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..bundle import ModelBundle
from ..config import read_json_object
from ..schedule import SamplingConfig
from ..vae import CausalFrameCounts
from .adapter import MatrixGameAdapter
from .dit import MatrixGameConfig, MatrixGameDiT

__all__ = ["PRESET_NAMES", "VARIANTS", "load_preset", "load_release", "is_release_dir", "variant_of",
           "load_weights", "sampling_for", "build_bundle"]

# variant -> (keyboard width, mouse, window in latent frames, denoising steps)
VARIANTS = {
    "universal": (4, True, 6, [1000.0, 666.0, 333.0]),
    "gta_drive": (2, True, 4, [1000.0, 666.0, 333.0]),
    "templerun": (7, False, 6, [1000.0, 750.0, 500.0, 250.0]),
}
PRESET_NAMES = {"matrix-game-2.0": "universal", "matrix-game-2.0-gta": "gta_drive",
                "matrix-game-2.0-templerun": "templerun", "matrix-game-tiny": "universal"}
UNUSED_GAINS = ("img_attn_q_norm.weight", "img_attn_k_norm.weight", "key_attn_q_norm.weight",
                "key_attn_k_norm.weight")


def variant_of(cfg: MatrixGameConfig) -> str:
    a = cfg.action_config
    if a is None:
        raise ValueError("a Matrix-Game model needs an action_config")
    kb = a.keyboard_dim_in if a.enable_keyboard else 0
    for name, (k, mouse, _, _) in VARIANTS.items():
        if k == kb and mouse == a.enable_mouse:
            return name
    return "custom"


def sampling_for(variant: str) -> SamplingConfig:
    steps = VARIANTS.get(variant, VARIANTS["universal"])[3]
    return SamplingConfig(denoising_steps=list(steps), warp=True, shift=5.0, block_frames=3)


def release_config(variant: str, *, tiny: bool = False) -> MatrixGameConfig:
    kb, mouse, window, _ = VARIANTS[variant]
    if tiny:
        act = dict(blocks=[0], enable_keyboard=True, enable_mouse=mouse, keyboard_dim_in=kb, mouse_dim_in=2,
                   hidden_size=16, keyboard_hidden_dim=128, mouse_hidden_dim=128, heads_num=2, img_hidden_size=64)
        return MatrixGameConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, image_dim=32,
                                action=act, local_attn_size=window, variant=variant)
    act = dict(blocks=list(range(15)), enable_keyboard=True, enable_mouse=mouse, keyboard_dim_in=kb, mouse_dim_in=2,
               hidden_size=128, keyboard_hidden_dim=1024, mouse_hidden_dim=1024, heads_num=16, img_hidden_size=1536)
    return MatrixGameConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, freq_dim=256, image_dim=1280,
                            action=act, local_attn_size=window, variant=variant)


def build_bundle(dit: MatrixGameDiT, *, name: str, decoder=None, image_encoder=None, height: int, width: int,
                 fps: int = 16) -> ModelBundle:
    cfg = dit.config
    variant = cfg.variant or variant_of(cfg)
    return ModelBundle(name=name, dit=dit.eval(), sampling=sampling_for(variant), decoder=decoder,
                       image_encoder=image_encoder, height=height, width=width, fps=fps,
                       window=cfg.local_attn_size, sink=cfg.sink_size,
                       extra={"positions": "absolute", "variant": variant}, adapter_class=MatrixGameAdapter,
                       frame_counts=CausalFrameCounts())


def load_preset(name: str, *, seed: int = 0, device="cpu", dtype=torch.float32) -> ModelBundle:
    variant = PRESET_NAMES[name]
    tiny = name == "matrix-game-tiny"
    cfg = release_config(variant, tiny=tiny)
    from ..clip_vision import CLIPVisionEncoder
    from ..vae import WanVAE
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            dit = MatrixGameDiT(cfg)
    dit.to(dtype=dtype)
    if tiny:
        vae = WanVAE.tiny(seed=seed)
        clip = CLIPVisionEncoder.random("tiny", seed=seed)
        h, w = 64, 64
    else:
        from diffusers import AutoencoderKLWan
        from ..vae import WAN21_VAE_CONFIG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = WanVAE(AutoencoderKLWan(**WAN21_VAE_CONFIG))
        clip = CLIPVisionEncoder.random("vit-h-14", seed=seed)
        h, w = 352, 640
    vae = vae.to(device=device, dtype=dtype)
    clip = clip.to(device=device, dtype=dtype)
    return build_bundle(dit, name=name, decoder=vae, image_encoder=clip, height=h, width=w)


def load_weights(dit: MatrixGameDiT, sd: dict, source) -> None:
    """A release state dict (``model.``-prefixed keys, or none) into dit, strictly: every parameter present with
    its shape, nothing unknown; the release's four unused action-norm gains are accepted when present."""
    from ..tensor_files import CheckpointError
    if sd and all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    own = dit.state_dict()
    unused = {k for k in own if k.endswith(UNUSED_GAINS)}
    missing = [k for k in own if k not in sd and k not in unused]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        what = []
        if missing:
            what.append(f"missing {len(missing)} keys (first: {', '.join(missing[:4])})")
        if unexpected:
            what.append(f"unexpected {len(unexpected)} keys (first: {', '.join(unexpected[:4])})")
        raise CheckpointError(f"{source}: not a checkpoint of this Matrix-Game model ({variant_of(dit.config)}, "
                              f"{dit.config.num_layers} layers): " + "; ".join(what))
    bad = [f"{k} {list(sd[k].shape)} (model: {list(v.shape)})" for k, v in own.items()
           if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{source}: shapes differ from the model's config: {'; '.join(bad[:3])}")
    dit.load_state_dict({k: v for k, v in sd.items()}, strict=False)


def is_release_dir(path) -> bool:
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        return False
    try:
        return "action_config" in json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _find(folder: Path, names: tuple) -> Path | None:
    for d in (folder, folder.parent):
        for n in names:
            if (d / n).exists():
                return d / n
    return None


def load_release(path: str | os.PathLike, *, device="cpu", dtype=torch.float32, vae=None, image_encoder=None,
                 height: int = 352, width: int = 640) -> ModelBundle:
    """A released Matrix-Game 2.0 model folder (see the module docstring)."""
    from ..tensor_files import CheckpointError, read_tensor_file
    folder = Path(path)
    kw = read_json_object(folder / "config.json", "Matrix-Game config.json", error=CheckpointError)
    weights = sorted(folder.glob("*.safetensors"))
    if len(weights) != 1:
        raise CheckpointError(f"{folder}: expected one *.safetensors checkpoint beside config.json, found "
                              f"{[w.name for w in weights] or 'none'}")
    sd, _ = read_tensor_file(weights[0])
    img = sd.get("model.img_emb.proj.0.weight", sd.get("img_emb.proj.0.weight"))
    if img is not None:
        kw = {**kw, "image_dim": int(img.shape[0])}
    cfg = MatrixGameConfig.from_release(kw)
    cfg.variant = variant_of(cfg)
    with torch.device("meta"):
        dit = MatrixGameDiT(cfg)
    dit = dit.to_empty(device="cpu")
    load_weights(dit, sd, weights[0])
    dit = dit.to(device=device, dtype=dtype)
    from ..vae import WanVAE
    vae_path = Path(vae) if vae is not None else _find(folder, ("Wan2.1_VAE.pth",))
    decoder = WanVAE.load(vae_path).to(device=device) if vae_path is not None else None
    enc = None
    clip_path = Path(image_encoder) if image_encoder is not None else _find(
        folder, ("models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "image_encoder"))
    if clip_path is not None:
        from ..clip_vision import CLIPVisionEncoder
        enc = CLIPVisionEncoder.load(clip_path, device=device, dtype=dtype)
    return build_bundle(dit, name=folder.name, decoder=decoder, image_encoder=enc, height=height, width=width)
