"""Synthetic videos with known properties for the LV-Bench tests (numpy only)."""
import numpy as np


def texture(h=48, w=64, seed=0, block=4):
    """Blocky random RGB texture: sharp edges, so blur and scene changes are measurable."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // block + 2, w // block + 2, 3), dtype=np.uint8)
    return np.kron(small, np.ones((block, block, 1), dtype=np.uint8))[:h, :w]


def pan(tex, t_frames, h=48, w=64, speed=1):
    """Camera panning right over a wider texture: frame t is a window shifted by speed*t pixels."""
    return np.stack([tex[:h, speed * t: speed * t + w] for t in range(t_frames)])


def box_blur(img, r):
    """Separable box blur of radius r (r = 0: unchanged), uint8 in, uint8 out."""
    if r == 0:
        return img
    x = img.astype(np.float64)
    k = 2 * r + 1
    for axis in (0, 1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r + 1, r)
        c = np.pad(x, pad, mode="edge").cumsum(axis)
        x = (np.take(c, range(k, c.shape[axis]), axis) - np.take(c, range(0, c.shape[axis] - k), axis)) / k
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def steady(t=40, seed=0):
    return pan(texture(48, 64 + t, seed), t)


def blurring(t=40, seed=0, max_r=3):
    v = steady(t, seed)
    return np.stack([box_blur(f, (i * (max_r + 1)) // t) for i, f in enumerate(v)])


def fading(t=40, seed=0):
    v = steady(t, seed).astype(np.float64)
    g = np.linspace(1.0, 0.25, t)[:, None, None, None]
    return np.round(v * g).astype(np.uint8)


def scene_cut(t=40, cut_at=25, seed=0):
    a = steady(t, seed)
    b = steady(t, seed + 100)
    return np.concatenate([a[:cut_at], b[cut_at:]])


def static(t=40, seed=0):
    return np.repeat(texture(48, 64, seed)[None], t, axis=0)


def gt_hook(frames, item):
    """Ground-truth hook for tests: the 'simulator' is a static copy of the first frame at a fixed position."""
    from inferix.lvbench.groundtruth import ground_truth_drift

    gt = np.repeat(frames[:1], len(frames), axis=0)
    pos = np.zeros((len(frames), 2))
    return ground_truth_drift(frames, gt, pos, pred_positions=pos + 2.0, num_chunks=5)
