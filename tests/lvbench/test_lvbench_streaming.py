"""Videos are scored frame by frame: bounded memory, the whole-video path's scores, limits checked up front."""
import tracemalloc
import weakref

import numpy as np
import pytest

import inferix.lvbench.runner as runner
from inferix.lvbench.backends import build_scorers
from inferix.lvbench.cli import main
from inferix.lvbench.runner import EvalConfig, evaluate_video, score_file
from inferix.lvbench.vde import FrameCountError, TooShortError, score_stream, score_video
from inferix.lvbench.video import iter_frames, probe_video, read_video, write_video
from lvbench_synth import box_blur, texture

METRICS = ["clarity", "motion", "aesthetic", "subject", "background", "dynamic"]
EXACT = ["clarity", "aesthetic", "subject", "background"]  # per-frame values combined as the whole-chunk path does
T, H, W = 300, 96, 128


def long_video(t=T, h=H, w=W):
    """A pan over a texture that blurs, fades and cuts to another scene: every metric drifts."""
    a, b = texture(h, w + t, seed=1, block=8), texture(h, w + t, seed=2, block=8)
    frames = []
    for i in range(t):
        src = a if i < 2 * t // 3 else b
        f = box_blur(src[:, i: i + w], i * 3 // t)
        frames.append(np.round(f * (1.0 - 0.5 * i / t)).astype(np.uint8))
    return np.stack(frames)


@pytest.fixture(scope="module")
def long_mp4(tmp_path_factory):
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    write_video(str(path), long_video(), fps=16)
    return str(path)


@pytest.fixture(scope="module")
def scorers():
    return build_scorers(METRICS, "weightfree")


def assert_same_scores(got, want):
    for m in METRICS:
        if m in EXACT:
            assert got[m]["chunk_scores"] == want[m]["chunk_scores"], m
            assert got[m]["vde"] == want[m]["vde"], m
        else:  # a float64 sum of per-frame errors instead of one float32 mean
            np.testing.assert_allclose(got[m]["chunk_scores"], want[m]["chunk_scores"], rtol=1e-6, err_msg=m)
            np.testing.assert_allclose(got[m]["vde"], want[m]["vde"], rtol=1e-4, err_msg=m)


def test_long_video_scores_match_whole_video_path(long_mp4, scorers):
    cfg = EvalConfig(metrics=METRICS, num_chunks=7)
    rec = evaluate_video(long_mp4, scorers, cfg)
    assert rec["status"] == "ok", rec["reason"]
    assert rec["num_frames"] == T and rec["chunk_frames"] == T // 7 and rec["fps"] == 16
    whole = read_video(long_mp4, cfg.max_side).frames
    assert whole.shape == (T, H, W, 3)
    assert_same_scores(rec["metrics"], score_video(whole, scorers, 7))
    # the same frames as one array or one by one: the drift is real, not codec noise
    assert rec["metrics"]["clarity"]["vde"] > 1 and rec["metrics"]["subject"]["vde"] > 0.1


@pytest.mark.slow
def test_peak_memory_is_a_few_frames_not_the_video(long_mp4, scorers):
    """numpy's allocations are traced deterministically: the streamed path's peak is a few frames' worth."""
    frame_bytes = H * W * 3
    cfg = EvalConfig(metrics=METRICS, num_chunks=10)
    evaluate_video(long_mp4, scorers, cfg)  # first-use imports are allocations too
    tracemalloc.start()
    try:
        rec = evaluate_video(long_mp4, scorers, cfg)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        score_video(read_video(long_mp4, cfg.max_side).frames, scorers, 10)
        _, whole_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rec["status"] == "ok"
    assert peak < 40 * frame_bytes, f"streamed peak {peak / frame_bytes:.1f} frames"
    assert whole_peak > T * frame_bytes  # the measure sees a whole video when one is held


def test_reader_never_holds_more_than_three_frames(long_mp4, scorers, monkeypatch):
    alive, most = [], [0]

    def tracked(path, max_side):
        for f in iter_frames(path, max_side):
            alive.append(weakref.ref(f))
            most[0] = max(most[0], sum(r() is not None for r in alive))
            yield f
            del f

    monkeypatch.setattr(runner, "iter_frames", tracked)
    rec = evaluate_video(long_mp4, scorers, EvalConfig(metrics=METRICS, num_chunks=10))
    assert rec["status"] == "ok" and len(alive) == T
    assert most[0] <= 3  # motion keeps the two frames before the current one


def test_frame_count_from_packets_and_a_wrong_announced_count(tmp_path, scorers):
    v = long_video(t=50, h=48, w=64)
    mkv = str(tmp_path / "v.mkv")  # matroska records no frame count: the packets are counted
    write_video(mkv, v, fps=8)
    info = probe_video(mkv, 512)
    assert info.num_frames == 50 and info.size == (48, 64) and info.frame_bytes == 48 * 64 * 3
    want = score_video(read_video(mkv).frames, scorers, 10)

    frames = list(iter_frames(mkv))
    with pytest.raises(FrameCountError, match="expected 80 frames, decoded 50"):
        score_stream(iter(frames), 80, scorers, 10)
    # a count that keeps the chunk bounds (55 // 10 == 50 // 10) is fine; frames past the chunks are counted
    got, n = score_stream(iter(frames), 55, scorers, 10)
    assert n == 50
    assert_same_scores(got, want)

    wrong = runner.VideoInfo(mkv, 80, info.fps, info.native_size, info.size)  # e.g. a truncated file's header
    got, n = score_file(mkv, scorers, EvalConfig(metrics=METRICS), wrong)
    assert n == 50
    assert_same_scores(got, want)
    with pytest.raises(TooShortError, match="50 frames give 1 per chunk"):
        score_file(mkv, scorers, EvalConfig(metrics=METRICS, num_chunks=50))


def test_memory_limit_refuses_before_decoding(long_mp4, scorers, monkeypatch, tmp_path, capsys):
    def no_decoding(*a, **k):
        raise AssertionError("decoded a video that is over the limit")

    monkeypatch.setattr(runner, "iter_frames", no_decoding)
    monkeypatch.setattr(runner, "read_video", no_decoding)
    out = tmp_path / "out"
    assert main(["eval", long_mp4, "--out", str(out), "--max-memory-gib", "0.0001", "--no-progress"]) == 1
    line = [x for x in capsys.readouterr().out.splitlines() if "FAILED" in x]
    assert len(line) == 1
    for part in (long_mp4, f"{T} frames of {W}x{H}", "GiB", "over the limit of 0.0001 GiB", "--max-memory-gib"):
        assert part in line[0], part

    # streamed, the video needs a few frames; held whole for a ground-truth hook, it needs them all
    frame_bytes = H * W * 3
    cfg = EvalConfig(metrics=METRICS, max_memory_gib=100 * frame_bytes / 2**30)
    need, _ = runner.estimate_memory(probe_video(long_mp4), scorers, cfg.num_chunks)
    assert need < 100 * frame_bytes
    rec = evaluate_video(long_mp4, scorers, cfg, ground_truth=lambda frames, item: None)
    assert rec["status"] == "failed" and "to hold the whole video for the ground-truth hook" in rec["reason"]


def test_chunk_held_for_a_scorer_without_accumulator(long_mp4, scorers):
    """A scorer with no per-frame accumulator gets its chunk whole: same scores, and the estimate counts it."""
    import dataclasses

    whole = {m: dataclasses.replace(s, stream=None, held_frames=0) for m, s in scorers.items()}
    cfg = EvalConfig(metrics=METRICS, num_chunks=5)
    got = evaluate_video(long_mp4, whole, cfg)
    want = evaluate_video(long_mp4, scorers, cfg)
    assert got["status"] == want["status"] == "ok"
    assert_same_scores(got["metrics"], want["metrics"])
    need, what = runner.estimate_memory(probe_video(long_mp4), whole, 5)
    assert need >= (T // 5) * H * W * 3 and f"chunk of {T // 5} frames" in what
