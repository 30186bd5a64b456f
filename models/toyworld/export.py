"""Toy-world training runs as inferix bundles: the export of a trainer's EMA weights (``export_bundle``), its
inverse for starting a run from a bundle (``bundle_tensors``), and the sampling and cache settings a bundle gets.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..schedule import SamplingConfig
from . import simulator as sim
from .text import LocalHashTextEncoder, collision_free_vocab, from_shared_table, to_shared_table

if TYPE_CHECKING:
    from .train import Trainer

__all__ = ["WINDOW_FRAMES", "SINK_FRAMES", "default_sampling", "training_words", "export_bundle", "bundle_tensors"]

# Cache of a bundle trained on contiguous clips (a run with sink_blocks exports its own clip layout instead):
WINDOW_FRAMES = 12  # context kept at inference, including the block being generated
# The first two blocks stay in the cache for good; in rollouts these anchor frames keep the scene from dissolving
# (docs/toyworld.md: 7 dB -> 16-21 dB PSNR), even for a model that never saw a gap in frame positions.
SINK_FRAMES = 8


def default_sampling(block_frames: int = 4) -> SamplingConfig:
    # Plain (unwarped, shift 1) timesteps: sigma = t / 1000, the noise levels the trainer samples from. Two steps,
    # sigma 1 then 0.5: the single x0 prediction from pure noise is the mean of what may come, which smears the
    # agent and the ball; re-noising it to 0.5 and predicting again commits to sharp ones (docs/toyworld.md:
    # palette share 45 -> 86 %, agent found in 98 -> 100 % of frames, for about 0.4 dB of PSNR).
    return SamplingConfig(denoising_steps=[1000.0, 500.0], warp=False, shift=1.0, context_timestep=0.0,
                          block_frames=block_frames, sampler="few_step")


def training_words() -> list[str]:
    """Every word the training prompts use (the rows of the text table that training reaches)."""
    return sorted(set(sim.FILLER_WORDS) | {w for ws in sim.THEME_WORDS.values() for w in ws})


def export_bundle(trainer: "Trainer", out_json: Path, sampling: SamplingConfig | None = None,
                  final_loss: float | None = None) -> Path:
    """Write the EMA weights as an inferix bundle: <name>.safetensors (dit.*, text.*) and <name>.json."""
    from safetensors.torch import save_file
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    c = trainer.cfg
    sampling = sampling or default_sampling(c.block_frames)
    if sampling.block_frames != c.block_frames:
        raise ValueError(f"sampling.block_frames {sampling.block_frames} != trained block_frames {c.block_frames}")
    tensors = trainer.named(True)
    # The bundle's text encoder is the shared HashTextEncoder (models/text_encoder.py), whose hashing differs
    # from the trainer's: move every training word's EMA row to its shared id in a table without collisions.
    words = training_words()
    vocab = collision_free_vocab(words, 4096)
    local = LocalHashTextEncoder(trainer.text.text_dim, trainer.text.text_len, trainer.text.vocab,
                                 trainer.text.seed)
    with torch.no_grad():
        local.embedding.weight.copy_(tensors.pop("text.embedding.weight"))
    if any(k.startswith("text.") for k in tensors):
        raise KeyError(f"unexpected text-encoder tensors {[k for k in tensors if k.startswith('text.')]}")
    tensors["text.embedding.weight"] = to_shared_table(local, words, vocab).contiguous()
    save_file(tensors, str(out_json.with_suffix(".safetensors")), metadata={"format": "inferix-bundle"})
    mc = c.model_config
    meta = {
        "format": "inferix-bundle", "name": "toyworld",
        "dit": mc.to_dict(), "sampling": sampling.to_dict(),
        "text_encoder": {"type": "hash", "text_dim": mc.text_dim, "text_len": mc.text_len, "vocab": vocab},
        "decoder": {"type": "pixel"}, "height": sim.SIZE, "width": sim.SIZE, "fps": 16,
        "actions": list(sim.ACTIONS), "default_prompt": "a red cube in a snowy field",  # in the training words
        # A run with a sink layout has been trained on exactly the cache the engine keeps with these.
        "window": c.clip_blocks * c.block_frames if c.sink_blocks else WINDOW_FRAMES,
        "sink": c.sink_blocks * c.block_frames if c.sink_blocks else SINK_FRAMES,
        "themes": {t: w for t, w in sim.THEME_WORDS.items()},
        "train": {"steps": trainer.step, "seed": c.seed, "batch": c.batch, "final_loss": final_loss,
                  "wall_time_s": round(trainer.wall, 1), "config": c.to_dict()},
    }
    out_json.write_text(json.dumps(meta, indent=2))
    return out_json


def bundle_tensors(bundle_json: Path, text: LocalHashTextEncoder) -> dict:
    """An exported bundle's DiT and text tensors under the trainer's names: the inverse of ``export_bundle``, the
    text table re-indexed back to the hashing of ``text`` (rows of words training never uses keep its values)."""
    from safetensors.torch import load_file
    path = bundle_json.with_suffix(".safetensors")
    if not path.exists():
        raise FileNotFoundError(f"bundle {bundle_json} has no {path.name} beside it")
    sd = load_file(str(path))
    if "text.embedding.weight" not in sd:
        raise KeyError(f"bundle {path} lacks text.embedding.weight")
    local = LocalHashTextEncoder(text.text_dim, text.text_len, text.vocab, text.seed)
    with torch.no_grad():
        local.embedding.weight.copy_(text.embedding.weight.detach().cpu())
    from_shared_table(sd.pop("text.embedding.weight"), local, training_words())
    out = {k: v for k, v in sd.items() if k.startswith("dit.")}
    out["text.embedding.weight"] = local.embedding.weight.detach()
    return out
