"""Video Drift Error (VDE), weight-free per-chunk metrics and an online drift monitor.

VDE (BlockVid / LV-Bench): split a video into N equal chunks (remainder frames dropped), score every chunk
with a base metric m, and sum the weighted relative change of every later chunk against the first:

    VDE = sum_{i=2..N} w_i * |m_i - m_1| / |m_1|,   w_i = N - i + 1 (linear) or ln(N - i + 1) (log)

Lower is better. The weights are not normalised (linear weights for N = 10 sum to 45), as in the protocol.
Edge cases: fewer than 2 chunks -> 0.0 (nothing to drift from); m_1 = 0 -> +inf (the relative error is
undefined; the protocol returns +inf); a NaN score -> NaN. The denominator is |m_1| so that a metric with
negative values (e.g. an untrained regression head) still gives a non-negative drift; for the protocol's
positive metrics this is the same formula.

The weight-free metrics here need only numpy, so the evaluator and ``DriftMonitor`` work on a machine with
no model weights. They are stand-ins for the protocol's learned metrics, not reproductions of them; every
result names the backend that produced it. This module lives on the engine floor so that the engine's CLI
can monitor drift while generating; ``inferix.lvbench`` builds on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "DEFAULT_NUM_CHUNKS",
    "METRIC_NAMES",
    "WEIGHT_FREE_METRICS",
    "WeightFreeMetric",
    "DriftMonitor",
    "chunk_bounds",
    "split_chunks",
    "vde",
    "vde_weights",
    "check_frames",
]

DEFAULT_NUM_CHUNKS = 10
# The protocol's five named VDE variants plus the dynamic-degree variant that its code also computes.
METRIC_NAMES = ("clarity", "motion", "aesthetic", "subject", "background", "dynamic")


# ----------------------------------------------------------------------------------------------------------
# VDE
# ----------------------------------------------------------------------------------------------------------
def vde_weights(num_chunks: int, weighting: str = "linear") -> np.ndarray:
    """Weights w_i for chunks i = 2..N (array of length N - 1; empty when N < 2)."""
    if num_chunks < 0:
        raise ValueError(f"num_chunks must be >= 0, got {num_chunks}")
    i = np.arange(2, num_chunks + 1, dtype=np.float64)
    if weighting == "linear":
        return num_chunks - i + 1
    if weighting == "log":
        # ln(N - i + 1): the last chunk gets weight ln(1) = 0, as in the protocol's log option.
        return np.log(num_chunks - i + 1)
    raise ValueError(f"weighting must be 'linear' or 'log', got {weighting!r}")


def vde(scores: Sequence[float], weighting: str = "linear", num_chunks: int | None = None) -> float:
    """Video Drift Error of per-chunk scores m_1..m_k.

    ``num_chunks`` (N) sets the weights; it defaults to ``len(scores)``. Passing N larger than the number
    of scores gives the running VDE of a video that is not finished yet: the partial sum uses the final
    weights, so it grows towards the full VDE as chunks arrive.
    """
    m = np.asarray(list(scores), dtype=np.float64)
    if m.ndim != 1:
        raise ValueError(f"scores must be a 1-D sequence, got shape {m.shape}")
    n = len(m) if num_chunks is None else int(num_chunks)
    if len(m) > n:
        raise ValueError(f"got {len(m)} chunk scores for num_chunks={n}")
    if len(m) < 2:
        return 0.0
    if np.isnan(m).any():
        return float("nan")
    m1 = m[0]
    if m1 == 0.0:
        return float("inf")
    w = vde_weights(n, weighting)[: len(m) - 1]
    return float(np.sum(w * np.abs(m[1:] - m1) / abs(m1)))


def chunk_bounds(num_frames: int, num_chunks: int = DEFAULT_NUM_CHUNKS) -> list[tuple[int, int]]:
    """[start, end) frame ranges of the N equal chunks; the remainder frames at the end are dropped.

    Returns an empty list when the video has fewer frames than chunks.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    size = num_frames // num_chunks
    if size == 0:
        return []
    return [(k * size, (k + 1) * size) for k in range(num_chunks)]


def check_frames(frames: np.ndarray, what: str = "frames") -> np.ndarray:
    """Validate a uint8 [T, H, W, 3] array (names the problem otherwise)."""
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{what} must have shape [T, H, W, 3], got {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {frames.dtype}")
    return frames


def split_chunks(frames: np.ndarray, num_chunks: int = DEFAULT_NUM_CHUNKS) -> list[np.ndarray]:
    """Views of the N equal chunks of a [T, H, W, 3] video (remainder dropped; [] if T < N)."""
    return [frames[a:b] for a, b in chunk_bounds(len(frames), num_chunks)]


# ----------------------------------------------------------------------------------------------------------
# Weight-free per-chunk metrics (numpy only). Each takes a uint8 chunk [T, H, W, 3] and returns a float.
# ----------------------------------------------------------------------------------------------------------
def _gray(frames: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma in [0, 255], float32 [T, H, W]."""
    f = frames.astype(np.float32)
    return f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114


def _area_downscale(x: np.ndarray, max_side: int) -> np.ndarray:
    """Integer-factor box downscale of [T, H, W] (or [T, H, W, C]) so that the long side is <= max_side.

    Structural similarity on full-resolution frames mostly measures encoder noise; a coarser grid measures
    layout, which is what subject/background consistency is about.
    """
    h, w = x.shape[1], x.shape[2]
    f = max(1, math.ceil(max(h, w) / max_side))
    if f == 1:
        return x
    h2, w2 = h // f, w // f
    x = x[:, : h2 * f, : w2 * f]
    # [T, H, W, ...] -> [T, H/f, f, W/f, f, ...] and average over the two f axes
    return x.reshape(x.shape[0], h2, f, w2, f, *x.shape[3:]).mean(axis=(2, 4))


def laplacian_variance(frames: np.ndarray) -> float:
    """Clarity: mean over frames of the variance of the 4-neighbour Laplacian of luma (sharpness)."""
    g = _gray(frames)
    if g.shape[1] < 3 or g.shape[2] < 3:
        raise ValueError(f"frames of {g.shape[1]}x{g.shape[2]} are too small for a 3x3 Laplacian")
    lap = (g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:] - 4.0 * g[:, 1:-1, 1:-1])
    return float(lap.reshape(len(g), -1).var(axis=1).mean())


def interpolation_smoothness(frames: np.ndarray) -> float:
    """Motion: drop every other frame, rebuild it as the mean of its neighbours, score
    (255 - mean abs error) / 255 (the protocol's formula with linear interpolation instead of AMT-S)."""
    if len(frames) < 3:
        raise ValueError(f"motion smoothness needs >= 3 frames per chunk, got {len(frames)}")
    f = frames.astype(np.float32)
    odd = np.arange(1, len(f) - 1, 2)  # dropped frames that have a kept frame on both sides
    pred = 0.5 * (f[odd - 1] + f[odd + 1])
    err = np.abs(f[odd] - pred).mean()
    return float((255.0 - err) / 255.0)


def colorfulness(frames: np.ndarray) -> float:
    """Aesthetic stand-in: Hasler & Suesstrunk colourfulness, mean over frames.

    Not an aesthetic model: it tracks colour saturation and spread, which wash out when a generated video
    fades or greys over time.
    """
    f = frames.astype(np.float32)
    rg = f[..., 0] - f[..., 1]
    yb = 0.5 * (f[..., 0] + f[..., 1]) - f[..., 2]
    t = len(f)
    rg = rg.reshape(t, -1)
    yb = yb.reshape(t, -1)
    c = np.sqrt(rg.std(1) ** 2 + yb.std(1) ** 2) + 0.3 * np.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2)
    return float(c.mean())


def _box_mean(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k windows ('valid' placement) of [T, H, W] via 2-D cumulative sums."""
    c = np.pad(x, ((0, 0), (1, 0), (1, 0))).cumsum(1).cumsum(2)
    s = c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]
    return s / float(k * k)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> np.ndarray:
    """Mean SSIM between luma stacks a, b [T, H, W] (values 0..255), box window; returns [T]."""
    k = min(window, a.shape[1], a.shape[2])
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    mu_a, mu_b = _box_mean(a, k), _box_mean(b, k)
    var_a = _box_mean(a * a, k) - mu_a**2
    var_b = _box_mean(b * b, k) - mu_b**2
    cov = _box_mean(a * b, k) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.reshape(len(s), -1).mean(1)


def _consistency(sim_to_prev: np.ndarray, sim_to_first: np.ndarray) -> float:
    """The protocol's consistency formula for frames t >= 2 of a chunk:
    mean of (max(0, sim(t-1, t)) + max(0, sim(1, t))) / 2."""
    return float(np.mean(0.5 * (np.maximum(sim_to_prev, 0.0) + np.maximum(sim_to_first, 0.0))))


def structural_consistency(frames: np.ndarray, max_side: int = 64) -> float:
    """Subject stand-in: the protocol's consistency formula with SSIM of coarse luma instead of DINO
    feature cosine. A scene cut or a morphing subject lowers it."""
    if len(frames) < 2:
        raise ValueError(f"subject consistency needs >= 2 frames per chunk, got {len(frames)}")
    g = _area_downscale(_gray(frames), max_side)
    prev = ssim(g[:-1], g[1:])
    first = ssim(np.broadcast_to(g[:1], g[1:].shape), g[1:])
    return _consistency(prev, first)


def _colour_hist(frames: np.ndarray, bins: int = 8) -> np.ndarray:
    """Joint RGB histogram per frame, normalised: [T, bins**3]."""
    q = (frames.astype(np.int32) * bins) // 256  # [T, H, W, 3] bin index per channel
    idx = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    t = len(frames)
    flat = idx.reshape(t, -1) + (np.arange(t) * bins**3)[:, None]
    h = np.bincount(flat.ravel(), minlength=t * bins**3).reshape(t, bins**3).astype(np.float64)
    return h / h.sum(1, keepdims=True)


def colour_consistency(frames: np.ndarray) -> float:
    """Background stand-in: the protocol's consistency formula with colour-histogram intersection instead
    of CLIP feature cosine. Changes of scene colour or lighting lower it."""
    if len(frames) < 2:
        raise ValueError(f"background consistency needs >= 2 frames per chunk, got {len(frames)}")
    h = _colour_hist(frames)
    prev = np.minimum(h[:-1], h[1:]).sum(1)
    first = np.minimum(h[:1], h[1:]).sum(1)
    return _consistency(prev, first)


def mean_frame_difference(frames: np.ndarray) -> float:
    """Dynamic degree stand-in: mean absolute luma difference of consecutive frames, in [0, 1].

    Continuous, unlike the protocol's boolean "is moving" test, so its VDE measures how much the amount
    of motion changes; a first chunk with no motion at all gives VDE = +inf, as in the protocol.
    """
    if len(frames) < 2:
        raise ValueError(f"dynamic degree needs >= 2 frames per chunk, got {len(frames)}")
    g = _gray(frames)
    return float(np.abs(np.diff(g, axis=0)).mean() / 255.0)


@dataclass(frozen=True)
class WeightFreeMetric:
    metric: str  # which VDE variant it scores
    backend: str  # name written into every result
    fn: Callable[[np.ndarray], float]
    min_frames: int  # frames a chunk needs

    def __call__(self, frames: np.ndarray) -> float:
        return self.fn(frames)


WEIGHT_FREE_METRICS: dict[str, WeightFreeMetric] = {
    "clarity": WeightFreeMetric("clarity", "weightfree:laplacian-variance", laplacian_variance, 1),
    "motion": WeightFreeMetric("motion", "weightfree:linear-interpolation-error", interpolation_smoothness, 3),
    "aesthetic": WeightFreeMetric("aesthetic", "weightfree:colorfulness", colorfulness, 1),
    "subject": WeightFreeMetric("subject", "weightfree:ssim-consistency", structural_consistency, 2),
    "background": WeightFreeMetric("background", "weightfree:colour-histogram-consistency", colour_consistency, 2),
    "dynamic": WeightFreeMetric("dynamic", "weightfree:mean-frame-difference", mean_frame_difference, 2),
}


def _resolve_metrics(metrics: Iterable[str] | None) -> list[str]:
    names = list(METRIC_NAMES if metrics is None else metrics)
    unknown = [m for m in names if m not in WEIGHT_FREE_METRICS]
    if unknown:
        raise ValueError(f"unknown drift metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
    if not names:
        raise ValueError("metrics must name at least one metric")
    return names


# ----------------------------------------------------------------------------------------------------------
# Online monitor
# ----------------------------------------------------------------------------------------------------------
class DriftMonitor:
    """Scores chunks while a video is being generated and keeps a running VDE per metric.

    Feed the frame blocks in order with ``update(block)`` (uint8 [T, H, W, 3]). Frames are buffered until a
    chunk of ``chunk_frames`` frames is complete; the chunk is then scored with the weight-free metrics and
    ``update`` returns a dict with the chunk index, its scores, all per-chunk scores so far and the running
    VDE (weights of the final N, so it ends equal to the full-video VDE). Frames after the N-th chunk are
    counted as dropped, as the protocol drops remainder frames.

    ``metrics=None`` scores every metric the chunk length allows (``summary()['skipped']`` lists the others:
    motion needs 3 frames per chunk, the consistency and dynamic metrics 2); an explicit list is checked.
    """

    def __init__(self, num_chunks: int = DEFAULT_NUM_CHUNKS, chunk_frames: int = 16,
                 metrics: Iterable[str] | None = None, weighting: str = "linear"):
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        self.skipped: list[str] = []
        if metrics is None:
            # every metric that a chunk this short can feed (motion needs 3 frames, consistency 2)
            self.metrics = [m for m in METRIC_NAMES if WEIGHT_FREE_METRICS[m].min_frames <= chunk_frames]
            self.skipped = [m for m in METRIC_NAMES if m not in self.metrics]
        else:
            self.metrics = _resolve_metrics(metrics)
            need = max(WEIGHT_FREE_METRICS[m].min_frames for m in self.metrics)
            if chunk_frames < need:
                raise ValueError(f"chunk_frames={chunk_frames} is too small: metrics {self.metrics} need >= {need}")
        vde_weights(num_chunks, weighting)  # validates the weighting name
        self.num_chunks = num_chunks
        self.chunk_frames = chunk_frames
        self.weighting = weighting
        self.scores: dict[str, list[float]] = {m: [] for m in self.metrics}
        self.frames_seen = 0
        self.frames_dropped = 0
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._shape: tuple[int, int] | None = None

    @property
    def chunks_done(self) -> int:
        return len(self.scores[self.metrics[0]])

    @property
    def complete(self) -> bool:
        return self.chunks_done >= self.num_chunks

    def running_vde(self) -> dict[str, float]:
        return {m: vde(s, self.weighting, self.num_chunks) for m, s in self.scores.items()}

    def update(self, block: np.ndarray) -> dict | None:
        block = check_frames(block, "block")
        if self._shape is None:
            self._shape = block.shape[1:3]
        elif block.shape[1:3] != self._shape:
            raise ValueError(f"block frame size {block.shape[1:3]} differs from earlier blocks {self._shape}")
        self.frames_seen += len(block)
        latest = None
        pos = 0
        while pos < len(block):
            if self.complete:
                self.frames_dropped += len(block) - pos
                break
            take = min(self.chunk_frames - self._buffered, len(block) - pos)
            self._buffer.append(block[pos:pos + take])
            self._buffered += take
            pos += take
            if self._buffered == self.chunk_frames:
                latest = self._score_chunk(np.concatenate(self._buffer, axis=0))
                self._buffer, self._buffered = [], 0
        return latest

    def _score_chunk(self, chunk: np.ndarray) -> dict:
        index = self.chunks_done  # 0-based index of the chunk being scored
        chunk_scores = {}
        for m in self.metrics:
            s = WEIGHT_FREE_METRICS[m](chunk)
            self.scores[m].append(s)
            chunk_scores[m] = s
        return {
            "chunk": index,
            "scores": chunk_scores,
            "chunk_scores": {m: list(s) for m, s in self.scores.items()},
            "vde": self.running_vde(),
            "frames_seen": self.frames_seen,
        }

    def summary(self) -> dict:
        return {
            "num_chunks": self.num_chunks,
            "chunk_frames": self.chunk_frames,
            "chunks_done": self.chunks_done,
            "complete": self.complete,
            "weighting": self.weighting,
            "frames_seen": self.frames_seen,
            "frames_pending": self._buffered,
            "frames_dropped": self.frames_dropped,
            "backends": {m: WEIGHT_FREE_METRICS[m].backend for m in self.metrics},
            "skipped": list(self.skipped),
            "chunk_scores": {m: list(s) for m, s in self.scores.items()},
            "vde": self.running_vde(),
        }
