"""Metric backends: turn a chunk of frames (uint8 [T, H, W, 3]) into one score.

Two families, and every result names the one it used:

* weight-free (``weightfree:*``), numpy only, from ``inferix.drift``; they run on any machine;
* reference (``reference:*``), the protocol's models, loaded from a local folder given with ``--weights``:

  ========== ============================================ =============================================
  metric     model                                        files under ``--weights DIR``
  ========== ============================================ =============================================
  clarity    MUSIQ trained on SPAQ (``lvbench.musiq``)    ``musiq/`` one ``.pth``/``.safetensors``
                                                          (e.g. ``musiq_spaq_ckpt-358bb6af.pth``)
  motion     AMT-S frame interpolation (``lvbench.amt``)  ``amt-s/`` one ``.pth``/``.safetensors``
                                                          (e.g. ``amt-s.pth``)
  aesthetic  LAION linear head on CLIP ViT-L/14           ``clip-vit-large-patch14/`` (transformers
                                                          format) and ``aesthetic/`` one ``.pth`` /
                                                          ``.safetensors`` (``sa_0_4_vit_l_14_linear.pth``)
  subject    DINO ViT-B/16                                ``dino-vitb16/`` (transformers ``ViTModel``)
  background CLIP ViT-B/32                                ``clip-vit-base-patch32/`` (transformers)
  dynamic    none: always weight-free (the protocol's RAFT test is not implemented)
  ========== ============================================ =============================================

  Checkpoints load with ``torch.load(weights_only=True)`` or safetensors; nothing is downloaded.

A scorer scores a whole chunk (``scorer(frames)``) or the same chunk fed frame by frame to
``scorer.accumulator()`` (see ``lvbench.streaming``), which holds a few frames (a batch of 16 for the CLIP
and DINO models) instead of the chunk and gives the same score (weight-free motion and dynamic: up to the
last bit of a float32).

Per-chunk scores follow the protocol (VBench's dimensions applied to one chunk): clarity is the mean MUSIQ
score of the chunk's frames (long side <= 512); motion drops every other frame, re-creates it with AMT-S
and scores (255 - mean abs error) / 255; aesthetic is the mean head output / 10 on L2-normalised CLIP
ViT-L/14 image embeddings; subject and background average, over frames t >= 2 of the chunk,
(max(0, cos(f_{t-1}, f_t)) + max(0, cos(f_1, f_t))) / 2 of DINO CLS / CLIP image features.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from inferix.drift import METRIC_NAMES, WEIGHT_FREE_METRICS

from .streaming import WEIGHT_FREE_STREAMS, Batched, BufferedChunk, PerFrameMean

BACKEND_CHOICES = ("auto", "weightfree", "reference")

REFERENCE_LAYOUT = {
    "clarity": {"musiq": "musiq"},
    "motion": {"amt": "amt-s"},
    "aesthetic": {"clip": "clip-vit-large-patch14", "head": "aesthetic"},
    "subject": {"dino": "dino-vitb16"},
    "background": {"clip": "clip-vit-base-patch32"},
}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ChunkScorer:
    metric: str
    backend: str
    min_frames: int
    fn: Callable[[np.ndarray], float]
    # a fresh per-chunk accumulator fed one frame at a time (see lvbench.streaming); None: the chunk is held whole
    stream: Callable[[], object] | None = None
    held_frames: int = 0  # frames an accumulator holds at most (for memory estimates); 0 = the whole chunk

    def __call__(self, frames: np.ndarray) -> float:
        return float(self.fn(frames))

    def accumulator(self):
        return self.stream() if self.stream is not None else BufferedChunk(self.fn)


def weight_free_scorer(metric: str) -> ChunkScorer:
    m = WEIGHT_FREE_METRICS[metric]
    return ChunkScorer(metric, m.backend, m.min_frames, m.fn, WEIGHT_FREE_STREAMS[metric], held_frames=2)


# ------------------------------------------------------------------------------------------------ helpers
def _to_tensor(frames: np.ndarray):
    import torch

    # [T, H, W, 3] uint8 -> [T, 3, H, W] float in [0, 1]
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0


def _resize_short(x, size: int):
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    s = size / min(h, w)
    return F.interpolate(x, (max(1, round(h * s)), max(1, round(w * s))), mode="bicubic", align_corners=False)


def _center_crop(x, size: int):
    h, w = x.shape[-2:]
    t, l = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return x[..., t:t + size, l:l + size]


def _normalize(x, mean, std):
    import torch

    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def clip_preprocess(frames: np.ndarray, size: int = 224):
    """CLIP input: short side to ``size`` (bicubic), centre crop, CLIP mean/std. -> [T, 3, size, size]."""
    x = _center_crop(_resize_short(_to_tensor(frames), size), size).clamp(0, 1)
    return _normalize(x, CLIP_MEAN, CLIP_STD)


def dino_preprocess(frames: np.ndarray, size: int = 224):
    """DINO input as in the protocol: short side to ``size``, no crop, ImageNet mean/std."""
    x = _resize_short(_to_tensor(frames), size).clamp(0, 1)
    return _normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def feature_consistency(feats) -> float:
    """The protocol's consistency formula on per-frame features [T, D] (cosine similarity)."""
    import torch.nn.functional as F

    if len(feats) < 2:
        raise ValueError(f"consistency needs >= 2 frames per chunk, got {len(feats)}")
    f = F.normalize(feats.float(), dim=-1)
    prev = (f[1:] * f[:-1]).sum(-1).clamp(min=0)
    first = (f[1:] * f[:1]).sum(-1).clamp(min=0)
    return float(((prev + first) / 2).mean())


def _batched(fn, x, batch: int):
    import torch

    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


# ------------------------------------------------------------------------------------------------ scorers
class ClipEmbedder:
    """Projected CLIP image embeddings from a transformers ``CLIPVisionModelWithProjection``."""

    def __init__(self, model, device: str = "cpu", batch: int = 16):
        self.model = model.to(device).eval()
        self.device, self.batch = device, batch
        self.size = model.config.image_size

    def __call__(self, frames: np.ndarray):
        import torch

        x = clip_preprocess(frames, self.size)
        with torch.no_grad():
            return _batched(lambda b: self.model(pixel_values=b.to(self.device)).image_embeds.float().cpu(),
                            x, self.batch)


def background_scorer(clip_model, device: str = "cpu", name: str = "reference:clip-vit-b32") -> ChunkScorer:
    emb = ClipEmbedder(clip_model, device)
    return ChunkScorer("background", name, 2, lambda fr: feature_consistency(emb(fr)),
                       lambda: Batched(emb, feature_consistency, emb.batch), held_frames=emb.batch)


def aesthetic_scorer(clip_model, head, device: str = "cpu",
                     name: str = "reference:laion-aesthetic-clip-vit-l14") -> ChunkScorer:
    import torch
    import torch.nn.functional as F

    emb = ClipEmbedder(clip_model, device)
    head = head.eval()
    d = clip_model.config.projection_dim
    if head.in_features != d:
        raise ValueError(f"aesthetic head takes {head.in_features} features but the CLIP model projects to {d}")

    def rate(embeds):
        with torch.no_grad():
            return float((head(F.normalize(embeds, dim=-1)) / 10.0).mean())

    return ChunkScorer("aesthetic", name, 1, lambda fr: rate(emb(fr)), lambda: Batched(emb, rate, emb.batch),
                       held_frames=emb.batch)


def subject_scorer(vit_model, device: str = "cpu", name: str = "reference:dino-vitb16",
                   batch: int = 16) -> ChunkScorer:
    import torch

    vit_model = vit_model.to(device).eval()
    size = vit_model.config.image_size

    def feats(frames):
        x = dino_preprocess(frames, size)
        with torch.no_grad():
            # CLS token after the final layer norm, as DINO's own forward returns
            return _batched(lambda b: vit_model(pixel_values=b.to(device), interpolate_pos_encoding=True)
                            .last_hidden_state[:, 0].float().cpu(), x, batch)

    return ChunkScorer("subject", name, 2, lambda fr: feature_consistency(feats(fr)),
                       lambda: Batched(feats, feature_consistency, batch), held_frames=batch)


def clarity_scorer(musiq_model, device: str = "cpu", name: str = "reference:musiq-spaq",
                   max_side: int = 512) -> ChunkScorer:
    import torch
    import torch.nn.functional as F

    musiq_model = musiq_model.to(device).eval()

    def one(img) -> float:
        h, w = img.shape[-2:]
        with torch.no_grad():
            if max(h, w) > max_side:  # the protocol scores at a long side of at most 512
                s = max_side / max(h, w)
                img = F.interpolate(img[None], (round(h * s), round(w * s)), mode="bilinear",
                                    antialias=True, align_corners=False)[0]
            return float(musiq_model(img[None].to(device))[0])

    def score(frames):
        return float(np.mean([one(img) for img in _to_tensor(frames)]))

    return ChunkScorer("clarity", name, 1, score,
                       lambda: PerFrameMean(lambda fr: one(_to_tensor(fr[None])[0]), dtype=np.float64), held_frames=1)


def motion_scorer(amt_model, device: str = "cpu", name: str = "reference:amt-s") -> ChunkScorer:
    import torch

    from .amt import pad16, unpad

    amt_model = amt_model.to(device).eval()
    embt = torch.tensor(0.5).view(1, 1, 1, 1)

    def error(a, b, pads, dropped: np.ndarray):
        """Mean abs error of the frame AMT-S puts between padded kept frames a, b against the dropped one."""
        with torch.no_grad():
            pred = unpad(amt_model(a.to(device), b.to(device), embt.to(device)), pads)
        pred = (pred[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        return np.abs(pred.astype(np.int16) - dropped.astype(np.int16)).mean()

    def smoothness(errs: list, n: int) -> float:
        if n < 3:
            raise ValueError(f"motion smoothness needs >= 3 frames per chunk, got {n}")
        return float((255.0 - np.mean(errs)) / 255.0)

    def score(frames):
        if len(frames) < 3:
            return smoothness([], len(frames))  # raises
        x, pads = pad16(_to_tensor(frames[0::2]))
        return smoothness([error(x[i:i + 1], x[i + 1:i + 2], pads, frames[2 * i + 1]) for i in range(len(x) - 1)],
                          len(frames))

    class Stream:
        """Kept (even) frames are padded as they come; each one closes the pair around the odd frame before it."""

        def __init__(self):
            self.n, self.kept, self.dropped, self.errs = 0, None, None, []

        def add(self, frame):
            if self.n % 2:
                self.dropped = frame
            else:
                x, pads = pad16(_to_tensor(frame[None]))
                if self.kept is not None:
                    self.errs.append(error(self.kept, x, pads, self.dropped))
                self.kept = x
            self.n += 1

        def score(self):
            return smoothness(self.errs, self.n)

    return ChunkScorer("motion", name, 3, score, Stream, held_frames=3)


# ------------------------------------------------------------------------------------------------ loading
def _single_checkpoint(folder: str) -> str:
    files = sorted(glob.glob(os.path.join(folder, "*.pth")) + glob.glob(os.path.join(folder, "*.pt"))
                   + glob.glob(os.path.join(folder, "*.safetensors")))
    if len(files) != 1:
        raise FileNotFoundError(f"{folder}: expected exactly one .pth/.pt/.safetensors checkpoint, found "
                                f"{[os.path.basename(f) for f in files] or 'none'}")
    return files[0]


def load_state_dict(path: str) -> dict:
    """Tensors of a checkpoint (safetensors, or torch.load with weights_only=True); unwraps the usual
    'params' / 'state_dict' / 'model' containers and a 'module.' prefix."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("params", "state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def missing_reference_weights(metric: str, weights_dir: str | None) -> list[str]:
    """Paths the reference backend of ``metric`` needs that are not there ([] = ready)."""
    if metric not in REFERENCE_LAYOUT:
        return [f"(no reference backend for {metric!r})"]
    if not weights_dir:
        return [f"--weights DIR/{d}" for d in REFERENCE_LAYOUT[metric].values()]
    return [os.path.join(weights_dir, d) for d in REFERENCE_LAYOUT[metric].values()
            if not os.path.isdir(os.path.join(weights_dir, d))]


def load_reference_scorer(metric: str, weights_dir: str, device: str = "cpu") -> ChunkScorer:
    missing = missing_reference_weights(metric, weights_dir)
    if missing:
        raise FileNotFoundError(f"reference backend for {metric!r} needs {missing}")
    paths = {k: os.path.join(weights_dir, d) for k, d in REFERENCE_LAYOUT[metric].items()}
    if metric == "clarity":
        from .musiq import MUSIQ

        model = MUSIQ()
        model.load_state_dict(load_state_dict(_single_checkpoint(paths["musiq"])), strict=True)
        return clarity_scorer(model, device)
    if metric == "motion":
        from .amt import AMTS

        model = AMTS()
        model.load_state_dict(load_state_dict(_single_checkpoint(paths["amt"])), strict=True)
        return motion_scorer(model, device)
    if metric in ("aesthetic", "background"):
        from transformers import CLIPVisionModelWithProjection

        clip = CLIPVisionModelWithProjection.from_pretrained(paths["clip"], local_files_only=True)
        if metric == "background":
            return background_scorer(clip, device)
        import torch

        sd = load_state_dict(_single_checkpoint(paths["head"]))
        if set(sd) != {"weight", "bias"}:
            raise ValueError(f"{paths['head']}: expected a linear head with keys weight, bias; got {sorted(sd)}")
        head = torch.nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
        head.load_state_dict(sd)
        return aesthetic_scorer(clip, head, device)
    if metric == "subject":
        from transformers import ViTModel

        return subject_scorer(ViTModel.from_pretrained(paths["dino"], local_files_only=True,
                                                       add_pooling_layer=False), device)
    raise ValueError(f"no reference backend for metric {metric!r}")


def build_scorers(metrics, backend: str = "auto", weights_dir: str | None = None,
                  device: str = "cpu") -> dict[str, ChunkScorer]:
    """One scorer per metric. ``auto`` takes the reference model when its weights are under
    ``weights_dir`` and the weight-free metric otherwise; ``reference`` fails when weights are missing
    (except for ``dynamic``, which has only a weight-free backend)."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
    if weights_dir and not os.path.isdir(weights_dir):
        raise FileNotFoundError(f"--weights {weights_dir}: no such directory")
    out = {}
    for m in metrics:
        use_ref = m in REFERENCE_LAYOUT and (
            backend == "reference" or (backend == "auto" and not missing_reference_weights(m, weights_dir)))
        out[m] = load_reference_scorer(m, weights_dir, device) if use_ref else weight_free_scorer(m)
    return out
