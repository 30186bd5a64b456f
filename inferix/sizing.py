"""Session arithmetic and memory estimates: plain ints, no torch.

One function says how many latent frames and blocks a session of N pixel frames makes and how many KV pages it
reserves; the engine opens sessions with it and the CLI and the demo size their page pools with it, so the two
can never disagree. ``estimate_engine_bytes`` tells what an engine will allocate before it allocates it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["SessionSpan", "pixel_to_latent", "session_span", "session_pages", "pool_pages",
           "estimate_engine_bytes", "available_memory", "check_memory", "MemoryLimitError"]

GIB = 2 ** 30


class MemoryLimitError(ValueError):
    """A request would allocate more than the configured limit or the memory the machine has free."""


@dataclass(frozen=True)
class SessionSpan:
    total_blocks: int  # generated blocks (the independent first frame, if any, is a block of its own)
    total_latent: int  # latent frames committed in all: given context + generated
    first_block_frames: int  # 1 when the first generated frame is a block of its own, else 0


def pixel_to_latent(bundle, num_frames: int) -> int:
    """Fewest latent frames that decode to at least num_frames pixel frames (the extra ones are trimmed)."""
    n = bundle.latent_frames(num_frames)
    while bundle.pixel_frames(n) < num_frames:
        n += 1
    return n


def session_span(bundle, num_frames: int, n_init: int = 0) -> SessionSpan:
    """Blocks and latent frames of a session that delivers num_frames pixel frames after n_init given latent
    frames of context."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    bf = bundle.sampling.block_frames
    first = 1 if (bundle.sampling.independent_first_frame and not n_init) else 0
    n_lat = pixel_to_latent(bundle, num_frames)
    blocks = first + -(-(n_lat - first) // bf)
    return SessionSpan(blocks, n_init + first + (blocks - first) * bf, first)


def session_pages(bundle, window: int | None, num_frames: int | None, n_init: int = 0) -> int:
    """KV pages a session reserves: its window, or every latent frame it commits when that is fewer or when
    there is no window (then num_frames must be given)."""
    if num_frames is None:
        if window is None:
            raise ValueError("a session without num_frames runs until cancelled and needs a window")
        return window
    total = session_span(bundle, num_frames, n_init).total_latent
    return total if window is None else min(window, total)


def pool_pages(bundle, window: int | None, max_sessions: int, num_frames: int | None = None,
               n_init: int = 0) -> int:
    """The pages max_sessions sessions of num_frames pixel frames hold at once, no more."""
    if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions <= 0:
        raise ValueError(f"max_sessions must be a positive int, got {max_sessions!r}")
    return max_sessions * session_pages(bundle, window, num_frames, n_init)


def estimate_engine_bytes(*, num_layers: int, kv_rows: int, page_tokens: int, num_heads: int, head_dim: int,
                          dtype_bytes: int, height: int, width: int, block_pixel_frames: int,
                          group_shapes: dict | None = None) -> dict:
    """What an engine allocates up front (the K/V pool, with the model's per-page cache groups: name -> one page's
    shape) and per decoded block (a float32 frame buffer, counted 8 times over for the decoder's working tensors),
    in bytes."""
    pool = 2 * num_layers * kv_rows * page_tokens * num_heads * head_dim * dtype_bytes
    for shape in (group_shapes or {}).values():
        n = 1
        for d in shape:
            n *= int(d)
        pool += kv_rows * n * dtype_bytes
    decode = 8 * block_pixel_frames * 3 * height * width * 4
    return {"kv_pool": pool, "decode": decode, "total": pool + decode}


def available_memory(device) -> int | None:
    """Bytes free for new tensors on the device (host memory for the CPU), or None when unknown."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        try:
            import torch
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no driver, no figure
            return None
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else None
        return None if pages is None else pages * os.sysconf("SC_PAGE_SIZE")


def check_memory(need: dict, *, limit_gib: float | None, device, what: str) -> None:
    """Refuse, with the numbers, a request whose estimate exceeds the limit or the free memory."""
    total = need["total"]
    parts = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.2f} GiB" for k, v in need.items() if k != "total")
    if limit_gib is not None and total > limit_gib * GIB:
        raise MemoryLimitError(f"{what} would allocate {total / GIB:.2f} GiB ({parts}), over the limit of "
                               f"{limit_gib:g} GiB (memory_limit_gib / --memory-limit-gib)")
    free = available_memory(device)
    if free is not None and total > 0.9 * free:
        raise MemoryLimitError(f"{what} would allocate {total / GIB:.2f} GiB ({parts}) but {device} has "
                               f"{free / GIB:.2f} GiB free")
