"""End to end through the command line: verify-fixture, generate (mp4), failures leave no broken file."""
import json
from pathlib import Path

import av
import numpy as np
import pytest

from inferix.cli import main
from inferix.sinks import VideoWriter


def test_verify_fixture_passes_and_can_fail(self_forcing_tiny, capsys):
    assert main(["verify-fixture", str(self_forcing_tiny)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out
    r = json.loads(out[: out.rindex("}") + 1])
    assert r["latents_max_abs_err"] <= 1e-4 and r["kv_layer0_k_max_abs_err"] <= 1e-4
    assert r["pages_in_use_after"] == 0
    assert main(["verify-fixture", str(self_forcing_tiny), "--tol", "1e-12"]) == 1


@pytest.mark.parametrize("name", ["self_forcing_tiny_window", "self_forcing_tiny_first_frame"])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_verify_fixture_window_sink_and_first_frame(name, backend, capsys):
    """Reference rollouts with a rolling window + sink (eviction) and with an independent first frame."""
    folder = Path(__file__).parent / "fixtures" / name
    assert main(["verify-fixture", str(folder), "--attention", backend]) == 0
    out = capsys.readouterr().out
    r = json.loads(out[: out.rindex("}") + 1])
    assert r["kv_layer0_k_max_abs_err"] <= 1e-4 and r["x0_max_abs_err"] <= 1e-4


def test_verify_fixture_triton_interpreter_on_window_fixture(capsys):
    from pathlib import Path
    folder = Path(__file__).parent / "fixtures" / "self_forcing_tiny_window"
    assert main(["verify-fixture", str(folder), "--attention", "triton"]) == 0


def test_verify_fixture_missing_folder(tmp_path, capsys):
    assert main(["verify-fixture", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def _count_frames(path):
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_generate_tiny_writes_mp4_with_profile(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    prof = tmp_path / "p.json"
    assert main(["generate", "--model", "tiny", "--frames", "13", "--out", str(out), "--profile", str(prof)]) == 0
    assert _count_frames(out) == 13
    p = json.loads(prof.read_text())
    for key in ("time_to_first_frame_s", "block_latency_p50_s", "block_latency_p95_s", "pixel_fps_including_decode",
                "time_split_s", "peak_memory_mib", "kv_pages_max_in_use"):
        assert p[key] is not None, key
    assert p["kv_pages_in_use"] == 0 and p["pixel_frames"] == 13
    assert not list(tmp_path.glob("*.partial"))


def test_generate_failure_leaves_no_file(tmp_path, monkeypatch, capsys):
    from inferix import runner

    calls = {"n": 0}
    orig = runner.Runner.execute

    def flaky(self, plan):
        calls["n"] += 1
        if calls["n"] > 6:
            raise RuntimeError("simulated device failure")
        return orig(self, plan)
    monkeypatch.setattr(runner.Runner, "execute", flaky)
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", "tiny", "--frames", "21", "--out", str(out)]) == 1
    assert "simulated device failure" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,msg", [
    (["--frames", "0"], "--frames must be positive"),
    (["--height", "60"], "multiple of 16"),
    (["--model", "no-such-model"], "unknown model"),
])
def test_generate_bad_input(tmp_path, capsys, args, msg):
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--model", "tiny", "--out", str(out), "--frames", "5"] + args)
    assert rc != 0
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_video_writer_one_encoder_and_abort(tmp_path):
    frames = (np.random.default_rng(0).random((5, 32, 48, 3)) * 255).astype(np.uint8)
    p = tmp_path / "a.mp4"
    with VideoWriter(p, fps=8) as w:
        w.write(frames[:2])
        w.write(frames[2:])
    assert _count_frames(p) == 5
    q = tmp_path / "b.mp4"
    with pytest.raises(ValueError, match="frame size changed"):
        with VideoWriter(q, fps=8) as w:
            w.write(frames)
            w.write(frames[:, :16])
    assert not q.exists() and not (tmp_path / "b.mp4.partial").exists()
    with pytest.raises(ValueError, match="uint8"):
        VideoWriter(tmp_path / "c.mp4").write(frames.astype(np.float32))


def test_flv_stream_container_keeps_encoding_across_batches(tmp_path):
    """The RTMP path muxes FLV; batches after the first must still be encoded (no end-of-stream per batch)."""
    frames = (np.random.default_rng(1).random((12, 32, 32, 3)) * 255).astype(np.uint8)
    p = tmp_path / "s.flv"
    with VideoWriter(p, fps=8) as w:
        for i in range(0, 12, 3):
            w.write(frames[i:i + 3])
    assert _count_frames(p) == 12


def test_toyworld_commands_are_a_plugin_of_the_engines_cli(capsys):
    """`toyworld` and `train` come through the inferix.commands entry points; the engine's CLI names neither."""
    from importlib.metadata import entry_points

    import inferix.cli
    eps = {ep.name: ep.value for ep in entry_points(group="inferix.commands")}
    assert eps["toyworld"] == "inferix.app.toyworld.cli:register"
    source = Path(inferix.cli.__file__).read_text()
    assert "app.toyworld" not in source and '"train"' not in source
    assert main(["train", "nothing"]) == 2 and "unknown training target 'nothing'" in capsys.readouterr().err
    for argv, prog in ((["train", "toyworld-decoder", "--help"], "inferix train toyworld-decoder"),
                       (["train", "toyworld-corrector", "-h"], "inferix train toyworld-corrector"),
                       (["toyworld", "eval", "--help"], "inferix toyworld eval")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0 and prog in capsys.readouterr().out


def test_toyworld_eval_through_engine_and_default_main_job(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["toyworld", "eval", "--frames", "16", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["summary"]
    assert m["engine"] and m["frames"] == 16 and m["pixel_fps_including_decode"] > 0
    assert (out / "drift.png").stat().st_size > 0 and (out / "strip.png").stat().st_size > 0
    # the main job: no --model gives the embedded toy world, which starts from its simulator's view of the prompt
    video = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "a snowy field", "--frames", "20", "--out", str(video)]) == 0
    assert _count_frames(video) == 20
    assert "toyworld" in capsys.readouterr().err  # the progress bar names the model


@pytest.mark.slow
def test_toyworld_eval_suite_reuses_one_engine_and_counts_targets(tmp_path, capsys):
    from inferix.app.toyworld.eval import SUITE, evaluate, evaluate_suite
    eps = [(12345, "a cube at night"), (9, "a cube on the grass")]
    res = evaluate_suite(frames=16, out=tmp_path / "suite", episodes=eps)
    assert [r["dir"] for r in res["per_episode"]] == ["seed12345_night", "seed9_meadow"]
    # Each episode is what a fresh engine gives for it alone: one engine across episodes leaks nothing.
    for (seed, prompt), row in zip(eps, res["per_episode"]):
        alone = evaluate(frames=16, out=tmp_path / f"alone{seed}", seed=seed, prompt=prompt)["summary"]
        kept = json.loads((tmp_path / "suite" / row["dir"] / "metrics.json").read_text())["summary"]
        for s in (alone, kept):
            assert s["seed"] == seed and s["prompt"] == prompt
        assert kept["psnr_per_32"] == pytest.approx(alone["psnr_per_32"])
        assert kept["agent_error_median_px"] == pytest.approx(alone["agent_error_median_px"])
        assert row["agent_error_median_px"] == pytest.approx(kept["agent_error_median_px"])
    # The counts are sums over the episodes' own metrics.json files.
    saved = json.loads((tmp_path / "suite" / "suite.json").read_text())
    kept = [json.loads((tmp_path / "suite" / r["dir"] / "metrics.json").read_text())["summary"]
            for r in saved["per_episode"]]
    s = saved["summary"]
    assert s["episodes"] == 2
    assert s["episodes_meeting"]["agent_error_median_le_2px"] == sum(k["agent_error_median_px"] <= 2 for k in kept)
    assert s["episodes_meeting"]["palette_share_ge_95_every_100"] == 0  # needs 1,000 frames
    assert s["agent_error_median_px_max"] == max(k["agent_error_median_px"] for k in kept)
    assert s["psnr_windows"] == 2 * 1 and s["psnr_windows_beating_both"] == sum(
        k["psnr_per_32"][0] > max(k["psnr_copy_last_per_32"][0], k["psnr_context_mean_per_32"][0]) for k in kept)
    # The standard suite: every theme on the default seed, episode folders that cannot collide.
    from inferix.models.toyworld import simulator as sim
    assert {sim.theme_of(p) for s_, p in SUITE if s_ == 12345} == set(sim.THEMES)
    with pytest.raises(ValueError, match="repeat"):
        evaluate_suite(frames=8, out=tmp_path / "dup", episodes=[(1, "a snowy field"), (1, "icy")])
    with pytest.raises(SystemExit):
        main(["toyworld", "eval", "--suite", "--seed", "3", "--out", str(tmp_path / "x")])
    assert "leave out --seed" in capsys.readouterr().err
    # Other episodes: a seed range cycling through the five themes' prompts.
    from inferix.app.toyworld.eval import seed_range_episodes
    assert [sim.theme_of(p) for _, p in seed_range_episodes("17-23")] == [
        "snow", "desert", "meadow", "forest", "night", "snow", "desert"]
    assert [s_ for s_, _ in seed_range_episodes("4")] == [4]
    for bad in ("9-3", "x-2"):
        with pytest.raises(ValueError, match=repr(bad)):
            seed_range_episodes(bad)
    assert main(["toyworld", "eval", "--suite-seeds", "5-6", "--frames", "8", "--out", str(tmp_path / "r")]) == 0
    rows = json.loads((tmp_path / "r" / "suite.json").read_text())["per_episode"]
    assert [r["dir"] for r in rows] == ["seed5_snow", "seed6_desert"]
    assert "| 6 | a cube in the desert |" in capsys.readouterr().out


def test_generate_with_mirror_views(tmp_path, capsys):
    video = tmp_path / "m.mp4"
    assert main(["generate", "--prompt", "a cube at night", "--frames", "8", "--model-option", "mirrors=h,hv",
                 "--model-option", "corrector=auto", "--actions", "left",
                 "--out", str(video)]) == 0
    assert _count_frames(video) == 8
    assert main(["generate", "--frames", "8", "--model-option", "mirrors=h,diagonal", "--out",
                 str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "model option mirrors: mirrors must be distinct names" in err and not (tmp_path / "x.mp4").exists()
    assert main(["generate", "--frames", "8", "--model-option", "mirrors", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "--model-option 'mirrors': expected KEY=VALUE" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny", "--frames", "8", "--model-option", "mirrors=h", "--out",
                 str(tmp_path / "x.mp4")]) == 2
    assert "unknown model option 'mirrors' for model 'tiny' (it takes: none)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["toyworld", "eval", "--mirrors", "h", "--from-truth", "2", "--out", str(tmp_path / "ft")])


@pytest.mark.slow
def test_toyworld_eval_from_truth_reports_one_block_errors(tmp_path):
    out = tmp_path / "ft"
    assert main(["toyworld", "eval", "--from-truth", "6", "--out", str(out)]) == 0
    r = json.loads((out / "from_truth.json").read_text())
    rows = r["per_block"]
    assert [b["first_frame"] for b in rows] == [8 + 4 * i for i in range(6)]
    # The bounce flags are the simulator's (same seed and actions as the eval).
    from inferix.models.toyworld import simulator as sim
    _, bounced = sim.World(12345, "a red cube in a snowy field").ball_path(8 + 24)
    assert [b["bounce"] for b in rows] == [bool(bounced[k:k + 4].any()) for k in range(8, 32, 4)]
    assert r["summary"]["bounce_blocks"] == sum(b["bounce"] for b in rows)
    # From true context the shipped model puts the agent and the ball near their true places in ordinary blocks.
    s = r["summary"]
    assert all(b["agent_found_frames"] == 4 for b in rows)
    assert s["agent_error_max_px_median"]["no_bounce"] < 4 and s["ball_error_max_px_median"]["no_bounce"] < 4
    # Per-frame errors: each block's worst frame is the maximum of its frames; the by-frame means average them.
    for b in rows:
        assert len(b["agent_error_px"]) == 4 and max(b["agent_error_px"]) == pytest.approx(b["agent_error_max_px"])
    plain = [b["agent_error_px"] for b in rows if not b["bounce"]]
    want = [sum(e[k] for e in plain) / len(plain) for k in range(4)]
    assert s["agent_error_px_mean_by_frame_in_block"]["no_bounce"] == pytest.approx(want)
    from inferix.app.toyworld.eval import evaluate_from_truth
    with pytest.raises(ValueError, match="context 6"):
        evaluate_from_truth(blocks=2, out=out, context=6)
