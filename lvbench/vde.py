"""VDE over a whole video: chunk it, score every chunk with each metric backend, compute VDE.

``score_video`` takes the decoded video as one array; ``score_stream`` takes its frames one at a time and
holds only what each metric's per-chunk accumulator needs (see ``lvbench.streaming``).

The formula and edge cases live in ``inferix.drift`` (shared with the engine's online monitor).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from inferix.drift import DEFAULT_NUM_CHUNKS, check_frames, chunk_bounds, split_chunks, vde, vde_weights

__all__ = ["DEFAULT_NUM_CHUNKS", "FrameCountError", "TooShortError", "chunk_bounds", "min_frames_per_chunk",
           "score_stream", "score_video", "split_chunks", "vde", "vde_weights"]


class TooShortError(ValueError):
    """The video has too few frames for the requested chunks and metrics."""


class FrameCountError(ValueError):
    """A stream held another number of frames than announced, and the chunk bounds depend on it."""

    def __init__(self, expected: int, actual: int):
        super().__init__(f"expected {expected} frames, decoded {actual}")
        self.expected, self.actual = expected, actual


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
    _check_length(len(frames), scorers, num_chunks)
    chunks = split_chunks(frames, num_chunks)
    out = {}
    for name, scorer in scorers.items():
        scores = [float(scorer(c)) for c in chunks]
        out[name] = {"backend": scorer.backend, "chunk_scores": scores, "vde": vde(scores, weighting)}
    return out


def _check_length(num_frames: int, scorers: Mapping, num_chunks: int) -> int:
    need = min_frames_per_chunk(scorers)
    per_chunk = num_frames // num_chunks
    if per_chunk < need:
        raise TooShortError(f"too short: {num_frames} frames give {per_chunk} per chunk for {num_chunks} chunks; "
                            f"metrics {sorted(scorers)} need >= {need} per chunk "
                            f"(>= {need * num_chunks} frames)")
    return per_chunk


def score_stream(frames: Iterable[np.ndarray], num_frames: int, scorers: Mapping,
                 num_chunks: int = DEFAULT_NUM_CHUNKS, weighting: str = "linear") -> tuple[dict, int]:
    """``score_video`` of a video given frame by frame (uint8 [H, W, 3] each), ``num_frames`` frames in all.

    Each chunk is scored by per-chunk accumulators (``scorer.accumulator()``) fed one frame at a time, so no
    more than a metric's accumulator needs is held: a few frames for the weight-free metrics, the chunk for a
    scorer that needs it whole. Frames after the last chunk are counted, not scored. Returns (the result of
    ``score_video``, frames read). Raises FrameCountError when the stream's length differs from
    ``num_frames`` in a way that moves the chunk bounds.
    """
    vde_weights(num_chunks, weighting)
    per_chunk = _check_length(num_frames, scorers, num_chunks)
    end = per_chunk * num_chunks
    scores: dict[str, list[float]] = {m: [] for m in scorers}
    accs: dict = {}
    shape = None
    n = 0
    for frame in frames:
        n += 1
        if n > end:
            continue
        if shape is None:
            check_frames(frame[None], "frame")
            shape = frame.shape
        elif frame.shape != shape or frame.dtype != np.uint8:
            raise ValueError(f"frame {n - 1} is {frame.dtype} {tuple(frame.shape)}, earlier frames uint8 {shape}")
        if (n - 1) % per_chunk == 0:
            accs = {m: s.accumulator() for m, s in scorers.items()}
        for acc in accs.values():
            acc.add(frame)
        if n % per_chunk == 0:
            for m, acc in accs.items():
                scores[m].append(float(acc.score()))
            accs = {}
    if n != num_frames and n // num_chunks != per_chunk:
        raise FrameCountError(num_frames, n)
    out = {name: {"backend": scorer.backend, "chunk_scores": scores[name], "vde": vde(scores[name], weighting)}
           for name, scorer in scorers.items()}
    return out, n
