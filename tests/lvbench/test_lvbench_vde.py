import math

import numpy as np
import pytest

from inferix.drift import chunk_bounds, split_chunks, vde, vde_weights
from inferix.lvbench.backends import weight_free_scorer
from inferix.lvbench.vde import TooShortError, score_video


def naive_vde(m, weighting="linear"):
    n = len(m)
    total = 0.0
    for i in range(2, n + 1):  # 1-based chunk index, as in the protocol
        w = (n - i + 1) if weighting == "linear" else math.log(n - i + 1)
        total += w * abs(m[i - 1] - m[0]) / m[0]
    return total


@pytest.mark.parametrize("weighting", ["linear", "log"])
def test_vde_matches_naive_formula(weighting):
    rng = np.random.default_rng(1)
    for n in (2, 3, 10, 17):
        m = list(rng.uniform(0.5, 2.0, n))
        assert vde(m, weighting) == pytest.approx(naive_vde(m, weighting), rel=1e-12)


def test_weights():
    assert vde_weights(10).tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1]
    assert vde_weights(10).sum() == 45  # not normalised
    lw = vde_weights(10, "log")
    assert lw[-1] == 0.0 and lw[0] == pytest.approx(math.log(9))
    with pytest.raises(ValueError, match="weighting"):
        vde_weights(10, "quadratic")


def test_hand_computed_value():
    # N = 3: w2 = 2, w3 = 1; m = [2, 1, 3] -> 2 * 0.5 + 1 * 0.5 = 1.5
    assert vde([2.0, 1.0, 3.0]) == pytest.approx(1.5)
    # log weights: ln 2 * 0.5 + ln 1 * 0.5
    assert vde([2.0, 1.0, 3.0], "log") == pytest.approx(0.5 * math.log(2))


def test_edge_cases():
    assert vde([]) == 0.0
    assert vde([3.0]) == 0.0  # fewer than 2 chunks: nothing to drift from
    assert vde([5.0, 5.0, 5.0]) == 0.0
    assert vde([0.0, 1.0]) == math.inf  # m1 = 0: relative error undefined, protocol gives +inf
    assert vde([0.0, 0.0]) == math.inf
    assert math.isnan(vde([1.0, float("nan")]))
    # a negative first score still gives a non-negative drift (|m1| in the denominator)
    assert vde([-2.0, -1.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        vde([1.0, 2.0, 3.0], num_chunks=2)


def test_running_vde_uses_final_weights():
    m = [1.0, 1.5, 0.5, 2.0]
    # after 2 of 4 chunks the only term is w_2 = 3 times |1.5 - 1| / 1
    assert vde(m[:2], num_chunks=4) == pytest.approx(1.5)
    assert vde(m, num_chunks=4) == pytest.approx(vde(m))


def test_chunk_bounds_drop_remainder():
    assert chunk_bounds(23, 5) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]  # frames 20..22 dropped
    assert chunk_bounds(9, 10) == []
    assert chunk_bounds(10, 10)[-1] == (9, 10)
    with pytest.raises(ValueError):
        chunk_bounds(10, 0)
    frames = np.zeros((23, 4, 4, 3), np.uint8)
    assert [len(c) for c in split_chunks(frames, 5)] == [4] * 5


def test_score_video_short_videos():
    frames = np.random.default_rng(0).integers(0, 256, (25, 8, 8, 3), dtype=np.uint8)
    motion = {"motion": weight_free_scorer("motion")}  # needs 3 frames per chunk
    with pytest.raises(TooShortError, match="25 frames give 2 per chunk"):
        score_video(frames, motion, num_chunks=10)
    clar = {"clarity": weight_free_scorer("clarity")}
    out = score_video(frames, clar, num_chunks=10)  # 2 frames per chunk is enough for clarity
    assert len(out["clarity"]["chunk_scores"]) == 10
    # one chunk: VDE is 0 by definition
    one = score_video(frames, clar, num_chunks=1)
    assert one["clarity"]["vde"] == 0.0 and len(one["clarity"]["chunk_scores"]) == 1
    with pytest.raises(ValueError, match="uint8"):
        score_video(frames.astype(np.float32), clar)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        score_video(frames[..., 0], clar)
