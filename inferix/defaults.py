"""The defaults of an engine, resolved in one place: ``Engine``, the command line and the demo hub all build engines,
and each must read "the model's window", "a pool for these sessions" or "the GPU when there is one" the same way.

- device: None (or "") -> ``cuda`` when a CUDA device is available, else ``cpu``;
- dtype: None -> bfloat16 on CUDA, float32 elsewhere; a name (``float32``/``fp32``, ``bfloat16``/``bf16``,
  ``float16``/``fp16``) -> that dtype;
- window: -1 -> the model's (``bundle.window``; ``unbounded_window`` when it has none and one is given), 0 or
  None -> no window (global attention), n -> n latent frames counting the sink and the block;
- sink: None -> the model's (``bundle.sink``, or the sink of ``unbounded_window`` when that window is used);
- kv_pages: None -> sized for the sessions when they are described (``start_prompt``: what ``max_sessions``
  sessions of ``num_frames`` pixel frames, starting from the model's own start frames for that prompt, reserve at
  once, ``inferix.sizing.pool_pages``), else ``max_sessions`` windows (24 pages per session without a window).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["EngineDefaults", "resolve_engine_defaults", "default_device", "resolve_dtype", "DTYPES",
           "NO_WINDOW_PAGES"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
NO_WINDOW_PAGES = 24  # pages per session of a pool sized without a window or session lengths


@dataclass(frozen=True)
class EngineDefaults:
    """Resolved engine settings. Without a bundle only ``device`` and ``dtype`` (what loading one needs) are
    resolved, and the rest stays None."""
    device: object  # as given (str or torch.device), or the default device's name
    dtype: torch.dtype
    window: int | None = None
    sink: int | None = None
    kv_pages: int | None = None


def default_device(cuda_available: bool | None = None) -> str:
    """``cuda`` when a CUDA device is available (``cuda_available``: the answer, for a caller that knows it)."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    return "cuda" if cuda_available else "cpu"


def resolve_dtype(dtype, device) -> torch.dtype:
    """The dtype a model loads in on ``device``: as given (a torch dtype or a name), else bfloat16 on CUDA and
    float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def resolve_engine_defaults(bundle=None, *, window=-1, sink=None, kv_pages=None, max_sessions: int = 4,
                            device=None, dtype=None, num_frames: int | None = None, start_prompt: str | None = None,
                            start_seed: int = 0, unbounded_window: tuple[int, int] | None = None,
                            cuda_available: bool | None = None) -> EngineDefaults:
    """Every default of an engine, by the rules in the module docstring. ``unbounded_window``: (window, sink) for
    a model without a window of its own, when the engine's streams must stay bounded (a server's run until
    stopped). Raises ValueError for sessions without a frame limit and without a window, when sized for them."""
    device = device or default_device(cuda_available)
    dtype = resolve_dtype(dtype, device)
    if bundle is None:
        return EngineDefaults(device=device, dtype=dtype)
    if window == -1:
        window = bundle.window
        if window is None and unbounded_window is not None:
            window, fallback_sink = unbounded_window
            sink = fallback_sink if sink is None else sink
    elif window == 0:
        window = None
    sink = bundle.sink if sink is None else sink
    if kv_pages is None:
        if start_prompt is not None:
            if window is None and num_frames is None:
                raise ValueError("sessions without a frame limit need a window (set a window or a frame limit)")
            from .sizing import pool_pages
            start = bundle.start_frames(start_prompt, start_seed)  # given start frames take pages too
            n_init = 0 if start is None else bundle.latent_frames(len(start))
            kv_pages = pool_pages(bundle, window, max_sessions, num_frames, n_init)
        else:
            kv_pages = max_sessions * (window or NO_WINDOW_PAGES)
    return EngineDefaults(device=device, dtype=dtype, window=window, sink=sink, kv_pages=kv_pages)
