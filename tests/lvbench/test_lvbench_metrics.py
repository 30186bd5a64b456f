"""Weight-free metrics on videos generated with known properties."""
import numpy as np
import pytest

from inferix.drift import WEIGHT_FREE_METRICS, colour_consistency, interpolation_smoothness, laplacian_variance, \
    mean_frame_difference, split_chunks, ssim, structural_consistency, vde
from lvbench_synth import blurring, box_blur, fading, scene_cut, static, steady, texture


def video_vde(video, metric, n=10):
    return vde([WEIGHT_FREE_METRICS[metric](c) for c in split_chunks(video, n)])


def test_static_video_has_no_drift():
    v = static()
    for m in ("clarity", "motion", "aesthetic", "subject", "background"):
        assert video_vde(v, m) == 0.0, m
    assert interpolation_smoothness(v) == 1.0
    # no motion at all: dynamic degree m1 = 0, VDE undefined -> +inf as in the protocol
    assert video_vde(v, "dynamic") == float("inf")


@pytest.mark.parametrize("degrade", [blurring, fading])
def test_blur_or_fade_has_larger_clarity_drift(degrade):
    steady_vde = video_vde(steady(), "clarity")
    assert video_vde(degrade(), "clarity") > 5 * steady_vde


def test_scene_cut_raises_subject_and_background_drift():
    assert video_vde(scene_cut(), "subject") > 2 * video_vde(steady(), "subject")
    assert video_vde(scene_cut(), "background") > 2 * video_vde(steady(), "background")


def test_faster_motion_raises_dynamic_drift():
    tex = texture(48, 64 + 200)
    const = np.stack([tex[:, t: t + 64] for t in range(40)])
    accel_pos = np.cumsum([1 + t // 8 for t in range(40)])  # speed grows from 1 to 5 px/frame
    accel = np.stack([tex[:, p: p + 64] for p in accel_pos])
    assert video_vde(accel, "dynamic") > 2 * video_vde(const, "dynamic")


def test_laplacian_variance_against_naive_loop():
    f = texture(10, 12, seed=3)[None]
    g = f[0].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    lap = [g[y - 1, x] + g[y + 1, x] + g[y, x - 1] + g[y, x + 1] - 4 * g[y, x]
           for y in range(1, 9) for x in range(1, 11)]
    assert laplacian_variance(f) == pytest.approx(np.var(lap), rel=1e-4)
    assert laplacian_variance(box_blur(f[0], 1)[None]) < laplacian_variance(f)


def test_interpolation_smoothness_formula():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    f = v.astype(np.float64)
    err = np.mean([np.abs(f[1] - (f[0] + f[2]) / 2).mean(), np.abs(f[3] - (f[2] + f[4]) / 2).mean()])
    assert interpolation_smoothness(v) == pytest.approx((255 - err) / 255, rel=1e-6)
    # a linear brightness ramp is perfectly interpolable
    ramp = np.stack([np.full((4, 4, 3), 10 * t, np.uint8) for t in range(7)])
    assert interpolation_smoothness(ramp) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=">= 3 frames"):
        interpolation_smoothness(v[:2])


def test_similarities():
    a = texture(32, 32, seed=1).astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert ssim(a[None], a[None])[0] == pytest.approx(1.0)
    b = texture(32, 32, seed=2).astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert ssim(a[None], b[None])[0] < 0.3
    two = np.stack([texture(32, 32, seed=1)] * 2)
    assert structural_consistency(two) == pytest.approx(1.0)
    assert colour_consistency(two) == pytest.approx(1.0)
    red = np.zeros((2, 8, 8, 3), np.uint8)
    red[..., 0] = 255
    red[1] = 0
    red[1, ..., 2] = 255  # frame 2 entirely blue: disjoint histograms
    assert colour_consistency(red) == 0.0
    assert mean_frame_difference(red) == pytest.approx((0.299 * 255 - 0.114 * 255) / 255, rel=1e-5)
