"""A model bundle: the denoiser plus what turns prompts into conditioning and latents into pixels.

Names a user can pass to ``load_model``:
- ``toyworld``: the trained toy world shipped in models/weights (pixel space, actions, themes by prompt);
- ``tiny``: random tiny Wan DiT + tiny Wan VAE + hashed-word text encoder (tests, smoke runs);
- ``wan2.1-t2v-1.3b`` / ``wan2.1-t2v-14b``: the real architectures with random weights (benchmarks);
- ``matrix-game-tiny`` / ``matrix-game-2.0`` (-gta, -templerun): Matrix-Game 2.0, tiny or at the released shapes,
  random weights (models/matrixgame/bundle.py);
- a path: a released Matrix-Game 2.0 folder (config.json with an action_config), a diffusers Wan pipeline
  directory, a bundle JSON written by this project, or a DiT checkpoint in any
  format ``checkpoints.load_dit`` reads (then pass ``vae=`` and ``text_encoder=`` paths for pixels and prompts).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import ModelAdapter
from .corrector import corrector_from
from .pixel_decoder import PixelDecoder, PixelRefiner
from .tensor_files import load_prefixed_strict
from .schedule import SamplingConfig, SAMPLING_PRESETS
from .wan_dit import CausalWanDiT, PRESETS, WanDiTConfig

__all__ = ["ModelBundle", "PixelDecoder", "load_model", "default_model", "MODEL_NAMES", "WEIGHTS_DIR"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
MODEL_NAMES = ["toyworld", "tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "matrix-game-tiny", "matrix-game-2.0",
               "matrix-game-2.0-gta", "matrix-game-2.0-templerun"]


def default_model() -> str:
    """The embedded default: the trained toy world when its weights are installed, else the tiny preset."""
    return "toyworld" if (WEIGHTS_DIR / "toyworld.json").exists() else "tiny"


@dataclass
class ModelBundle:
    name: str
    dit: CausalWanDiT
    sampling: SamplingConfig
    decoder: object | None = None  # WanVAE or PixelDecoder: new_stream / decode_block / encode
    text_encoder: object | None = None  # encode(prompt) -> [1, Lt, text_dim]
    height: int = 64
    width: int = 64
    fps: int = 16
    actions: list | None = None  # action names of a world model, id = index
    window: int | None = None  # default window (latent frames, incl. the current block)
    sink: int = 0
    extra: dict = field(default_factory=dict)
    corrector: object | None = None  # ActionCorrector run on each block's last estimate before its commit, or None
    adapter_class: type = ModelAdapter  # what is special about this model (models/adapter.py)
    image_encoder: object | None = None  # encode_image(uint8 [H, W, 3]) -> image tokens (image-conditioned models)
    frame_counts: object | None = None  # pixel_frames / latent_frames when there is no decoder to ask

    @property
    def adapter(self) -> ModelAdapter:
        """A fresh adapter of this bundle (an engine configures its own with its model options)."""
        return self.adapter_class(self)

    @property
    def spatial_ratio(self) -> int:
        return self.decoder.spatial_ratio if self.decoder is not None else 8

    def latent_frames(self, n_pixel: int) -> int:
        counts = self.decoder if self.decoder is not None else self.frame_counts
        return n_pixel if counts is None else counts.latent_frames(n_pixel)

    def pixel_frames(self, n_latent: int) -> int:
        counts = self.decoder if self.decoder is not None else self.frame_counts
        return n_latent if counts is None else counts.pixel_frames(n_latent)

    def start_frames(self, prompt: str, seed: int = 0):
        """The frames a session of this model starts from when none are given (its adapter's), or None."""
        return self.adapter.start_frames(prompt, seed)

    def encode_prompt(self, prompt) -> torch.Tensor:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if self.text_encoder is None:
            raise ValueError(f"model {self.name!r} has no text encoder; pass text_encoder=PATH or text embeddings")
        with torch.no_grad():
            return self.text_encoder.encode(prompt)


def _device_dtype(bundle: ModelBundle, device, dtype) -> ModelBundle:
    bundle.dit.to(device=device, dtype=dtype)
    if isinstance(bundle.text_encoder, torch.nn.Module):
        bundle.text_encoder.to(device=device)
    if bundle.decoder is not None and hasattr(bundle.decoder, "to"):
        bundle.decoder.to(device=device)
    if bundle.corrector is not None:
        bundle.corrector.to(device=device)
    if isinstance(bundle.image_encoder, torch.nn.Module):
        bundle.image_encoder.to(device=device)
    bundle.dit.eval()
    return bundle


def _hash_encoder(text_dim: int, text_len: int, vocab: int = 4096, seed: int = 0):
    from .text_encoder import HashTextEncoder
    return HashTextEncoder(text_dim=text_dim, text_len=text_len, vocab=vocab, seed=seed)


def _random_dit(cfg: WanDiTConfig, seed: int, device="cpu") -> CausalWanDiT:
    """Random weights, initialised directly on the target device (a 14B model never touches host memory)."""
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            return CausalWanDiT(cfg)


def pixel_decoder_from(meta: dict, sd: dict, source, channels: int) -> PixelDecoder | None:
    """The bundle's decoder: ``{"type": "pixel"}`` (identity), optionally with ``"refiner": {"channels": C,
    "layers": L[, "reference_frames": K]}`` whose weights are the ``decoder.`` tensors of the bundle's safetensors;
    None for other types."""
    dec_meta = meta.get("decoder") or {"type": "pixel"}
    if dec_meta.get("type") != "pixel":
        return None
    ref_meta = dec_meta.get("refiner")
    if ref_meta is None:
        return PixelDecoder(channels)
    try:
        refiner = PixelRefiner(int(ref_meta["channels"]), int(ref_meta["layers"]),
                               int(ref_meta.get("reference_frames", 0)))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: decoder.refiner must give integer 'channels' and 'layers' (and optionally "
                         f"'reference_frames' >= 0), got {ref_meta!r}") from e
    load_prefixed_strict(refiner, sd, "decoder.", source)
    return PixelDecoder(channels, refiner)


def save_bundle(tensors: dict, meta: dict, out_json) -> Path:
    """Write a bundle: ``tensors`` to <out_json>.safetensors (whole, under a temporary name, then moved into
    place), then ``meta`` to out_json."""
    from safetensors.torch import save_file
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"format": "inferix-bundle"})
    tmp.replace(out_json.with_suffix(".safetensors"))
    out_json.write_text(json.dumps(meta, indent=2))
    return out_json


def load_bundle_json(path: Path, device, dtype) -> ModelBundle:
    meta = json.loads(Path(path).read_text())
    if meta.get("format") != "inferix-bundle":
        raise ValueError(f"{path} is not an inferix bundle (format={meta.get('format')!r})")
    from safetensors.torch import load_file
    weights = Path(path).with_suffix(".safetensors")
    if not weights.exists():
        raise FileNotFoundError(f"bundle weights not found: {weights}")
    sd = load_file(str(weights))
    cfg = WanDiTConfig.from_dict(meta["dit"], what="dit config")
    from .checkpoints import build_dit
    dit = build_dit({k[4:]: v for k, v in sd.items() if k.startswith("dit.")}, cfg, source=str(weights))
    te_meta = meta.get("text_encoder") or {}
    text = None
    if te_meta.get("type") == "hash":
        text = _hash_encoder(te_meta["text_dim"], te_meta["text_len"], te_meta.get("vocab", 4096))
        load_prefixed_strict(text, sd, "text.", weights)
        text.eval()
    decoder = pixel_decoder_from(meta, sd, weights, cfg.in_dim)
    corrector = None
    if meta.get("corrector") is not None:
        if not isinstance(decoder, PixelDecoder) or cfg.in_dim != 3 or not cfg.num_actions:
            raise ValueError(f"{weights}: a corrector needs a pixel-space model with actions")
        corrector = corrector_from(meta, sd, weights, cfg.num_actions)
    from .toyworld.adapter import ToyWorldAdapter  # pixel-space bundles are the toy world's format
    bundle = ModelBundle(name=meta.get("name", Path(path).stem), dit=dit,
                         sampling=SamplingConfig.from_dict(meta["sampling"], what="sampling config"),
                         decoder=decoder, text_encoder=text, height=meta.get("height", 64),
                         width=meta.get("width", 64), fps=meta.get("fps", 16), actions=meta.get("actions"),
                         window=meta.get("window"), sink=meta.get("sink", 0), extra=meta,
                         corrector=corrector,
                         adapter_class=ToyWorldAdapter if isinstance(decoder, PixelDecoder) else ModelAdapter)
    return _device_dtype(bundle, device, dtype)


def load_model(name_or_path: str | os.PathLike, *, device="cpu", dtype=torch.float32, vae=None,
               text_encoder=None, sampling: str | SamplingConfig | None = None, seed: int = 0,
               decoder: str | None = None, decoder_weights: str | os.PathLike | None = None) -> ModelBundle:
    """Load a bundle by preset name or path (see module docstring).

    ``decoder="taehv"`` swaps a Wan2.1-latent model's VAE decoder for TAEHV (``models/taehv.py``) read from
    ``decoder_weights`` (``taew2_1`` or ``lighttaew2_1``, .pth or .safetensors)."""
    if decoder is not None and decoder != "taehv":
        raise ValueError(f"unknown decoder {decoder!r}; known: 'taehv' (or None for the model's own)")
    if decoder is not None and decoder_weights is None:
        raise ValueError("decoder='taehv' needs decoder_weights=PATH (taew2_1.pth, lighttaew2_1.safetensors, ...)")
    if decoder is None and decoder_weights is not None:
        raise ValueError(f"decoder_weights={str(decoder_weights)!r} given without decoder='taehv'")
    if decoder_weights is not None and not Path(decoder_weights).exists():
        raise FileNotFoundError(f"decoder weights not found: {decoder_weights}")
    name = str(name_or_path)
    if name == "toyworld":
        p = WEIGHTS_DIR / "toyworld.json"
        if not p.exists():
            raise FileNotFoundError(f"the toy world weights are missing from this install ({p})")
        bundle = load_bundle_json(p, device, dtype)
        bundle.extra.setdefault("simulator", "toyworld")
    elif name == "tiny":
        from .vae import WanVAE
        cfg = PRESETS["tiny"]
        bundle = ModelBundle(name="tiny", dit=_random_dit(cfg, seed), sampling=SAMPLING_PRESETS["self_forcing"],
                             decoder=WanVAE.tiny(seed=seed), text_encoder=_hash_encoder(cfg.text_dim, cfg.text_len),
                             height=64, width=64)
        bundle = _device_dtype(bundle, device, dtype)
    elif name.startswith("matrix-game") and name in MODEL_NAMES:
        from .matrixgame.bundle import load_preset
        bundle = load_preset(name, seed=seed, device=device, dtype=dtype)
    elif name in PRESETS:
        from .vae import WanVAE
        cfg = PRESETS[name]
        from diffusers import AutoencoderKLWan
        from .vae import WAN21_VAE_CONFIG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae_m = WanVAE(AutoencoderKLWan(**WAN21_VAE_CONFIG)).to(device=device, dtype=dtype)
        bundle = ModelBundle(name=name, dit=_random_dit(cfg, seed, device), sampling=SAMPLING_PRESETS["self_forcing"],
                             decoder=vae_m, text_encoder=_hash_encoder(cfg.text_dim, 32),
                             height=480, width=832)
        bundle = _device_dtype(bundle, device, dtype)
    else:
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"unknown model {name!r}: not a preset ({', '.join(MODEL_NAMES)}) and no such "
                                    f"file or directory")
        from .matrixgame.bundle import is_release_dir
        if path.suffix == ".json":
            bundle = load_bundle_json(path, device, dtype)
        elif is_release_dir(path):  # a released Matrix-Game 2.0 model (config.json with an action_config)
            from .matrixgame.bundle import load_release
            bundle = load_release(path, device=device, dtype=dtype, vae=vae)
            vae = None
        elif path.is_dir() and (path / "model_index.json").exists():
            from .checkpoints import load_pipeline_dir
            dit, vae_m, te = load_pipeline_dir(path, device=device, dtype=dtype)
            bundle = ModelBundle(name=path.name, dit=dit, sampling=SAMPLING_PRESETS["self_forcing"], decoder=vae_m,
                                 text_encoder=te, height=480, width=832)
            bundle = _device_dtype(bundle, device, dtype)
        else:
            from .checkpoints import load_dit
            dit = load_dit(path, device=device, dtype=dtype)
            bundle = ModelBundle(name=path.stem, dit=dit, sampling=SAMPLING_PRESETS["self_forcing"],
                                 height=480, width=832)
            bundle = _device_dtype(bundle, device, dtype)
    if vae is not None:
        from .vae import WanVAE
        bundle.decoder = WanVAE.load(vae).to(device=device)
    if decoder == "taehv":
        from .taehv import TAEHVDecoder
        from .vae import WanVAE
        old = bundle.decoder  # a Wan2.1 VAE, or none on a bare 16-channel DiT checkpoint
        wan21 = old is None or (isinstance(old, WanVAE) and old.latent_channels == 16)
        if bundle.dit.config.in_dim != 16 or not wan21:
            what = f"a {type(old).__name__}" if old is not None else "no decoder"
            raise ValueError(f"decoder='taehv' decodes Wan2.1 latents (16 channels) in place of a Wan VAE; "
                             f"{bundle.name!r} has {what} and {bundle.dit.config.in_dim} latent channels")
        stats = {} if old is None else dict(latents_mean=old.latents_mean, latents_std=old.latents_std)
        bundle.decoder = TAEHVDecoder.load(decoder_weights, device=device, **stats)
    if text_encoder is not None:
        from .text_encoder import UMT5TextEncoder
        bundle.text_encoder = UMT5TextEncoder.from_dir(text_encoder, text_len=bundle.dit.config.text_len)
    if sampling is not None:
        bundle.sampling = SAMPLING_PRESETS[sampling] if isinstance(sampling, str) else sampling
    return bundle
