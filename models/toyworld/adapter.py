"""The toy world's model adapter (``models/adapter.py``): what the engine needs to know about a pixel-space,
action-conditioned world model and nothing more.

- start frames: a session starts from its simulator's view of the prompt and seed (bundles that name the
  simulator: ``"simulator": "toyworld"``);
- model option ``mirrors`` (e.g. ``hv,d,a``): mirror views of the symmetric arena run beside each stream, one
  extra row and one extra cache lane per view, their predictions mapped back and averaged every denoise step;
- model option ``corrector`` (``auto``, ``on``, ``off``; bundles with an action corrector): the corrector moves
  each finished block's estimate before it is committed; ``auto`` runs it unless mirror views run (it is trained
  to commit what they would);
- the finished block, an image, is clamped to [-1, 1] before its commit.
"""
from __future__ import annotations

import torch

from ..adapter import ModelAdapter, ModelOption
from ..corrector import CORRECTOR_MODES, use_corrector
from ..mirrors import action_permutation, check_mirrors, mirror_tensor, needs_square, parse_mirrors
from ..pixel_decoder import PixelDecoder

__all__ = ["ToyWorldAdapter", "mirror_views"]


def _mirrors(value) -> tuple:
    if value is None or isinstance(value, str):
        return parse_mirrors(value)
    return check_mirrors(value)


def _corrector(value):
    """None (auto), True or False, from themselves or from the command line's auto / on / off."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in CORRECTOR_MODES:
        return CORRECTOR_MODES[value.strip().lower()]
    raise ValueError(f"must be auto, on or off, got {value!r}")


def mirror_views(bundle, mirrors) -> list:
    """Validated mirror views of ``bundle``: a list of (name, action-id permutation or None)."""
    check_mirrors(mirrors)
    if bundle.spatial_ratio != 1 or not isinstance(bundle.decoder, PixelDecoder):
        raise ValueError(f"mirror views need a pixel-space model (latents are images); {bundle.name!r} is not")
    s = bundle.sampling
    if s.sampler != "few_step" or bundle.dit.config.prediction != "x0" or s.guidance_scale != 1.0:
        raise ValueError("mirror views need an x0-predicting model sampled with the few-step sampler, no guidance")
    if needs_square(mirrors) and bundle.height != bundle.width:
        raise ValueError(f"mirrors {needs_square(mirrors)} transpose the frame, which needs a square one; "
                         f"{bundle.name!r} makes {bundle.height}x{bundle.width}")
    names = list(bundle.actions or [])
    model = repr(bundle.name)
    return [(m, action_permutation(m, names, model) if names else None) for m in mirrors]


class ToyWorldAdapter(ModelAdapter):
    options = (
        ModelOption("mirrors", _mirrors, (), "mirror views (h, v, hv, d, a), comma-separated, run beside each "
                    "stream and averaged every block; steadier, slower"),
        ModelOption("corrector", _corrector, None, "the action corrector (auto, on, off): auto runs it when the "
                    "bundle has one and no mirror views run"),
    )

    def __init__(self, bundle):
        super().__init__(bundle)
        self.views: list = []  # [(mirror name, action permutation tensor or None)]
        self.corrector = None  # the bundle's ActionCorrector when it runs
        self.clamp = False

    def check(self) -> None:
        b = self.bundle
        mirrors = self.values["mirrors"]
        views = mirror_views(b, mirrors) if mirrors else []
        dev = next(b.dit.parameters()).device
        self.views = [(m, None if perm is None else torch.tensor(perm, device=dev)) for m, perm in views]
        run = use_corrector(self.values["corrector"], b.corrector is not None, mirrors, repr(b.name))
        self.values["corrector"] = run
        self.corrector = b.corrector if run else None
        self.clamp = isinstance(b.decoder, PixelDecoder)  # the clean block is an image in [-1, 1]

    def settings(self) -> dict:
        return {"mirrors": list(self.values["mirrors"]), "corrector": self.values["corrector"]}

    # ---- the seam -----------------------------------------------------------------------------------------
    def start_frames(self, prompt: str, seed: int = 0):
        b = self.bundle
        if b.extra.get("simulator") != "toyworld":
            return None
        from .simulator import simulate
        n = int(b.extra.get("start_frames", 2 * b.sampling.block_frames))
        frames, _ = simulate(int(seed), ["none"] * n, prompt, n)
        return frames

    def lanes(self) -> int:
        return len(self.views)  # view j's K/V: lane j + 1 of the stream's pages

    def extra_rows(self, x, actions) -> list:
        return [(mirror_tensor(x, m), actions if actions is None or perm is None else perm[actions])
                for m, perm in self.views]

    def combine(self, own, extras: list):
        if not extras:
            return own
        back = [mirror_tensor(o, m) for o, (m, _) in zip(extras, self.views)]
        return (own + sum(back)) / (1 + len(back))

    def finish_block(self, x0s: list, previous: list, actions):
        if self.corrector is not None:  # every finished block in one pass per frame; frame 0 follows the
            x0s = list(self.corrector.blocks(torch.stack(x0s), previous, actions))  # stream's last committed one
        if self.clamp:
            x0s = [x0.clamp(-1, 1) for x0 in x0s]
        return x0s
