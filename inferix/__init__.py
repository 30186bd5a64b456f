"""Inferix: an inference engine for block-diffusion video world models.

    import inferix
    engine = inferix.Engine.from_pretrained("toyworld")
    for frames in engine.generate("a sunny meadow", num_frames=64):   # uint8 [T, H, W, 3] per block
        ...
    inferix.generate("a snowy night", "video.mp4", num_frames=64)

The heavy parts (torch, the engine) load on first use, so light modules such as ``inferix.drift`` import fast.
"""
__version__ = "0.1.0"

_LAZY = {"Engine": "engine", "Session": "engine", "AdmissionError": "engine", "generate": "api",
         "default_model": "api", "VideoWriter": "sinks", "Mp4Writer": "sinks", "load_model": "api"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'inferix' has no attribute {name!r}")
