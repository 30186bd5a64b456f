"""VDE over a whole video: chunk it, score every chunk with each metric backend, compute VDE.

The formula and edge cases live in ``inferix.drift`` (shared with the engine's online monitor).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from inferix.drift import DEFAULT_NUM_CHUNKS, check_frames, chunk_bounds, split_chunks, vde, vde_weights

__all__ = ["DEFAULT_NUM_CHUNKS", "TooShortError", "chunk_bounds", "min_frames_per_chunk", "score_video",
           "split_chunks", "vde", "vde_weights"]


class TooShortError(ValueError):
    """The video has too few frames for the requested chunks and metrics."""


def min_frames_per_chunk(scorers: Mapping) -> int:
    return max([s.min_frames for s in scorers.values()] + [1])


def score_video(frames: np.ndarray, scorers: Mapping, num_chunks: int = DEFAULT_NUM_CHUNKS,
                weighting: str = "linear") -> dict:
    """Per-metric chunk scores and VDE of a uint8 [T, H, W, 3] video.

    Returns {metric: {"backend", "chunk_scores", "vde"}}. Raises TooShortError when a chunk would hold
    fewer frames than the most demanding metric needs (e.g. motion needs 3).
    """
    check_frames(frames)
    vde_weights(num_chunks, weighting)  # validates both before any work
    need = min_frames_per_chunk(scorers)
    per_chunk = len(frames) // num_chunks
    if per_chunk < need:
        raise TooShortError(f"too short: {len(frames)} frames give {per_chunk} per chunk for {num_chunks} chunks; "
                            f"metrics {sorted(scorers)} need >= {need} per chunk "
                            f"(>= {need * num_chunks} frames)")
    chunks = split_chunks(frames, num_chunks)
    out = {}
    for name, scorer in scorers.items():
        scores = [float(scorer(c)) for c in chunks]
        out[name] = {"backend": scorer.backend, "chunk_scores": scores, "vde": vde(scores, weighting)}
    return out
