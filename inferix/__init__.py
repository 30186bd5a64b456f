"""Inferix: an inference engine for block-diffusion video world models.

    import inferix
    engine = inferix.Engine.from_pretrained("toyworld")
    for frames in engine.generate("a sunny meadow", num_frames=64):   # uint8 [T, H, W, 3] per block
        ...
    inferix.generate("a snowy night", "video.mp4", num_frames=64)
"""
__version__ = "0.1.0"

from .engine import AdmissionError, Engine, Session  # noqa: E402
from .api import generate, default_model  # noqa: E402
from .sinks import VideoWriter, Mp4Writer  # noqa: E402

__all__ = ["Engine", "Session", "AdmissionError", "generate", "default_model", "VideoWriter", "Mp4Writer"]
