import numpy as np
import pytest

from inferix.drift import DriftMonitor, WEIGHT_FREE_METRICS, split_chunks, vde
from lvbench_synth import blurring, static


def offline(video, metrics, n):
    chunks = split_chunks(video, n)
    return {m: [WEIGHT_FREE_METRICS[m](c) for c in chunks] for m in metrics}


def test_streaming_equals_offline_with_ragged_blocks():
    video = blurring(t=43)  # 43 = 10 chunks of 4 frames + 3 dropped
    metrics = ["clarity", "motion", "subject", "dynamic"]
    mon = DriftMonitor(num_chunks=10, chunk_frames=4, metrics=metrics)
    sizes = [3, 1, 5, 2, 7, 4, 9, 12]  # blocks cross chunk boundaries in every way
    assert sum(sizes) == 43
    events, pos = [], 0
    for s in sizes:
        ev = mon.update(video[pos: pos + s])
        pos += s
        if ev is not None:
            events.append(ev)
    ref = offline(video[:40], metrics, 10)
    summ = mon.summary()
    assert summ["complete"] and summ["chunks_done"] == 10
    assert summ["frames_seen"] == 43 and summ["frames_dropped"] == 3
    for m in metrics:
        assert summ["chunk_scores"][m] == pytest.approx(ref[m], rel=1e-6)
        assert summ["vde"][m] == pytest.approx(vde(ref[m]), rel=1e-6)
    assert summ["backends"]["clarity"] == "weightfree:laplacian-variance"
    # the latest completed chunk is reported; the running VDE grows with the final weights
    assert events[-1]["chunk"] == 9
    first = next(e for e in events if e["chunk"] >= 1)
    k = first["chunk"] + 1
    assert first["vde"]["clarity"] == pytest.approx(vde(ref["clarity"][:k], num_chunks=10), rel=1e-6)


def test_update_returns_none_until_a_chunk_completes():
    mon = DriftMonitor(num_chunks=3, chunk_frames=4, metrics=["clarity"])
    v = static(t=12)
    assert mon.update(v[:3]) is None
    ev = mon.update(v[3:4])
    assert ev["chunk"] == 0 and ev["vde"]["clarity"] == 0.0 and ev["frames_seen"] == 4
    assert mon.summary()["frames_pending"] == 0
    assert mon.update(v[4:6]) is None
    assert mon.summary()["frames_pending"] == 2


def test_default_metrics_follow_chunk_length():
    assert DriftMonitor(chunk_frames=3).metrics == ["clarity", "motion", "aesthetic", "subject", "background",
                                                    "dynamic"]
    short = DriftMonitor(num_chunks=2, chunk_frames=1)
    assert short.metrics == ["clarity", "aesthetic"]
    short.update(static(t=2))
    s = short.summary()
    assert s["skipped"] == ["motion", "subject", "background", "dynamic"] and s["vde"] == {"clarity": 0.0,
                                                                                         "aesthetic": 0.0}
    assert DriftMonitor(chunk_frames=2).skipped == ["motion"]


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown drift metric"):
        DriftMonitor(metrics=["sharpness"])
    with pytest.raises(ValueError, match="chunk_frames=2 is too small"):
        DriftMonitor(chunk_frames=2, metrics=["motion"])
    with pytest.raises(ValueError, match="weighting"):
        DriftMonitor(weighting="cubic")
    with pytest.raises(ValueError, match="chunk_frames must be >= 1"):
        DriftMonitor(chunk_frames=0)
    mon = DriftMonitor(num_chunks=2, chunk_frames=3)
    with pytest.raises(ValueError, match="uint8"):
        mon.update(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        mon.update(np.zeros((2, 8, 8), np.uint8))
    mon.update(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="differs"):
        mon.update(np.zeros((2, 8, 10, 3), np.uint8))
