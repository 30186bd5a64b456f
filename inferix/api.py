"""One-call helpers on top of the Engine."""
from __future__ import annotations

from pathlib import Path

from inferix.models.bundle import default_model, load_model  # noqa: F401  (re-exported)

from .engine import Engine
from .sinks import VideoWriter

__all__ = ["generate", "default_model", "load_model"]


def generate(prompt: str, out: str | Path = "video.mp4", *, model: str | None = None, num_frames: int = 48,
             seed: int = 0, engine: Engine | None = None, progress: bool = False, **kw) -> Path:
    """Generate a video and write it to ``out`` (mp4); returns the path. Extra keywords go to Engine.generate."""
    eng = engine or Engine.from_pretrained(model or default_model())
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_frames, unit="frame", desc="generating")
    with VideoWriter(out, fps=eng.fps) as w:
        for block in eng.generate(prompt, num_frames=num_frames, seed=seed, **kw):
            w.write(block)
            if bar is not None:
                bar.update(len(block))
    if bar is not None:
        bar.close()
    return Path(out)
