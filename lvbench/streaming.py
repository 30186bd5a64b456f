"""Per-chunk accumulators: score a chunk fed one frame at a time, holding only what the metric needs.

An accumulator has ``add(frame)`` (one uint8 [H, W, 3] frame, in order) and ``score()`` (the chunk's score,
called once after its last frame). The weight-free ones give the scores of ``inferix.drift``'s whole-chunk
functions: clarity, aesthetic, subject and background bit for bit (they are per-frame or per-pair values
combined in the same order); motion and dynamic sum per-frame errors in float64 where the whole-chunk
functions take one float32 mean, so they can differ in the last bit of their float32 result.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from inferix.drift import (_area_downscale, _colour_hist, _consistency, _gray, colorfulness, laplacian_variance,
                           ssim)

STRUCTURE_MAX_SIDE = 64  # structural_consistency's default grid


class BufferedChunk:
    """Fallback for a scorer that needs the whole chunk at once: keeps the chunk's frames, scores at the end."""

    def __init__(self, scorer: Callable[[np.ndarray], float]):
        self.scorer = scorer
        self.frames: list[np.ndarray] = []

    def add(self, frame: np.ndarray) -> None:
        self.frames.append(frame)

    def score(self) -> float:
        chunk, self.frames = np.stack(self.frames), []
        return float(self.scorer(chunk))


class PerFrameMean:
    """Mean of a per-frame value (float32 values averaged as a float32 array, as a [T] numpy mean would)."""

    def __init__(self, per_frame: Callable[[np.ndarray], float], dtype=np.float32):
        self.per_frame = per_frame
        self.dtype = dtype
        self.values: list[float] = []

    def add(self, frame: np.ndarray) -> None:
        self.values.append(self.per_frame(frame))

    def score(self) -> float:
        return float(np.asarray(self.values, dtype=self.dtype).mean())


class Batched:
    """Features of ``batch`` frames at a time (the batches a whole-chunk call would cut), reduced at the end."""

    def __init__(self, embed: Callable[[np.ndarray], object], reduce: Callable[[object], float], batch: int):
        self.embed, self.reduce, self.batch = embed, reduce, batch
        self.pending: list[np.ndarray] = []
        self.feats: list = []

    def add(self, frame: np.ndarray) -> None:
        self.pending.append(frame)
        if len(self.pending) == self.batch:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.feats.append(self.embed(np.stack(self.pending)))
            self.pending = []

    def score(self) -> float:
        import torch

        self._flush()
        return float(self.reduce(torch.cat(self.feats)))


# ------------------------------------------------------------------------------------------------ weight-free
class InterpolationSmoothness:
    """Streaming ``interpolation_smoothness``: odd frames j of the chunk rebuilt from frames j - 1 and j + 1."""

    def __init__(self):
        self.n = 0
        self.prev: list[np.ndarray] = []  # the last two frames (uint8)
        self.err_sum = 0.0
        self.err_count = 0

    def add(self, frame: np.ndarray) -> None:
        if self.n >= 2 and self.n % 2 == 0:  # frame n closes the triple around odd frame n - 1
            a, b = (x.astype(np.float32) for x in self.prev)
            diff = np.abs(b - 0.5 * (a + frame.astype(np.float32)))
            self.err_sum += float(diff.sum(dtype=np.float64))
            self.err_count += diff.size
        self.prev = (self.prev + [frame])[-2:]
        self.n += 1

    def score(self) -> float:
        if self.n < 3:
            raise ValueError(f"motion smoothness needs >= 3 frames per chunk, got {self.n}")
        err = np.float32(self.err_sum / self.err_count)
        return float((255.0 - err) / 255.0)


class _AgainstFirstAndPrevious:
    """Streaming consistency: a per-frame feature compared with the previous and with the first frame's."""
    what = ""

    def __init__(self):
        self.first = self.prev = None
        self.to_prev: list[float] = []
        self.to_first: list[float] = []

    def feature(self, frame: np.ndarray):
        raise NotImplementedError

    def similarity(self, a, b) -> float:
        raise NotImplementedError

    def add(self, frame: np.ndarray) -> None:
        f = self.feature(frame)
        if self.first is None:
            self.first = f
        else:
            self.to_prev.append(self.similarity(self.prev, f))
            self.to_first.append(self.similarity(self.first, f))
        self.prev = f

    def score(self) -> float:
        if not self.to_prev:
            raise ValueError(f"{self.what} consistency needs >= 2 frames per chunk, got {int(self.first is not None)}")
        return _consistency(np.asarray(self.to_prev), np.asarray(self.to_first))


class StructuralConsistency(_AgainstFirstAndPrevious):
    """Streaming ``structural_consistency``: SSIM of coarse luma to the previous and to the first frame."""
    what = "subject"

    def __init__(self, max_side: int = STRUCTURE_MAX_SIDE):
        super().__init__()
        self.max_side = max_side

    def feature(self, frame):
        return _area_downscale(_gray(frame[None]), self.max_side)

    def similarity(self, a, b):
        return ssim(a, b)[0]


class ColourConsistency(_AgainstFirstAndPrevious):
    """Streaming ``colour_consistency``: histogram intersection with the previous and the first frame."""
    what = "background"

    def feature(self, frame):
        return _colour_hist(frame[None])

    def similarity(self, a, b):
        return np.minimum(a, b).sum(1)[0]


class MeanFrameDifference:
    """Streaming ``mean_frame_difference``: mean absolute luma change of consecutive frames."""

    def __init__(self):
        self.n = 0
        self.prev = None
        self.diff_sum = 0.0
        self.diff_count = 0

    def add(self, frame: np.ndarray) -> None:
        g = _gray(frame[None])[0]
        if self.prev is not None:
            d = np.abs(g - self.prev)
            self.diff_sum += float(d.sum(dtype=np.float64))
            self.diff_count += d.size
        self.prev = g
        self.n += 1

    def score(self) -> float:
        if self.n < 2:
            raise ValueError(f"dynamic degree needs >= 2 frames per chunk, got {self.n}")
        return float(np.float32(self.diff_sum / self.diff_count) / 255.0)


WEIGHT_FREE_STREAMS: dict[str, Callable[[], object]] = {
    "clarity": lambda: PerFrameMean(lambda fr: laplacian_variance(fr[None])),
    "motion": InterpolationSmoothness,
    "aesthetic": lambda: PerFrameMean(lambda fr: colorfulness(fr[None])),
    "subject": StructuralConsistency,
    "background": ColourConsistency,
    "dynamic": MeanFrameDifference,
}
