"""`lvbench eval` and `lvbench run` end to end on small mp4 files."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from inferix.lvbench.cli import main
from inferix.lvbench.runner import EvalConfig, evaluate_videos, load_prompts, prompt_schedule, run_benchmark, \
    SAMPLE_PROMPTS
from inferix.lvbench.video import read_video, write_video
from lvbench_synth import blurring, static, steady, texture


def strict_json(path):
    def bad(c):
        raise AssertionError(f"non-standard JSON constant {c}")

    with open(path) as f:
        return json.load(f, parse_constant=bad)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    write_video(str(d / "a_steady.mp4"), steady(), fps=8)
    write_video(str(d / "b_blurring.mp4"), blurring(), fps=8)
    write_video(str(d / "c_static.mp4"), static(), fps=8)
    write_video(str(d / "d_short.mp4"), steady(t=6), fps=8)
    (d / "e_corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    return d


def test_eval_end_to_end(videos, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["eval", str(videos), "--out", str(out), "--workers", "2", "--no-progress"])
    assert rc == 1  # some videos failed; the others finished
    doc = strict_json(out / "results.json")
    by = {os.path.basename(v["path"]): v for v in doc["videos"]}
    assert [os.path.basename(v["path"]) for v in doc["videos"]] == sorted(by)  # input order kept
    assert by["d_short.mp4"]["status"] == "failed" and "too short" in by["d_short.mp4"]["reason"]
    assert by["e_corrupt.mp4"]["status"] == "failed" and "e_corrupt.mp4" in by["e_corrupt.mp4"]["reason"]
    for name in ("a_steady.mp4", "b_blurring.mp4", "c_static.mp4"):
        v = by[name]
        assert v["status"] == "ok" and v["num_frames"] == 40 and v["chunk_frames"] == 4
        assert set(v["metrics"]) == {"clarity", "motion", "aesthetic", "subject", "background", "dynamic"}
        for r in v["metrics"].values():
            assert r["backend"].startswith("weightfree:") and len(r["chunk_scores"]) == 10
    clar = lambda n: by[n]["metrics"]["clarity"]["vde"]  # noqa: E731
    assert clar("b_blurring.mp4") > 5 * clar("a_steady.mp4")
    assert by["c_static.mp4"]["metrics"]["motion"]["vde"] < 0.01  # codec noise only
    assert doc["summary"]["clarity"]["videos"] == 3

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 3 * 6 + 2
    assert {r["status"] for r in rows if r["path"].endswith("e_corrupt.mp4")} == {"failed"}
    steady_rows = [r for r in rows if r["path"].endswith("a_steady.mp4") and r["metric"] == "clarity"]
    assert float(steady_rows[0]["vde"]) == pytest.approx(clar("a_steady.mp4"), rel=1e-6)

    html = (out / "report.html").read_text()
    assert "Summary" in html and "too short" in html and html.count("<img") == 3
    pngs = sorted(os.listdir(out / "plots"))
    assert len(pngs) == 3
    with Image.open(out / "plots" / pngs[0]) as im:
        assert im.format == "PNG" and im.size == (640, 360)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    printed = capsys.readouterr().out
    assert "3/5 videos evaluated" in printed and "FAILED" in printed


def test_eval_options_and_errors(videos, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["eval", str(videos / "a_steady.mp4"), str(videos / "b_blurring.mp4"), "--out", str(out),
               "--metrics", "clarity,subject", "--chunks", "4", "--weighting", "log", "--no-progress"])
    assert rc == 0
    doc = strict_json(out / "results.json")
    assert doc["config"]["weighting"] == "log" and doc["config"]["num_chunks"] == 4
    assert set(doc["videos"][0]["metrics"]) == {"clarity", "subject"}
    assert len(doc["videos"][0]["metrics"]["clarity"]["chunk_scores"]) == 4
    gt_out = tmp_path / "gt"
    assert main(["eval", str(videos / "a_steady.mp4"), str(videos / "c_static.mp4"), "--out", str(gt_out),
                 "--metrics", "clarity", "--ground-truth", "lvbench_synth:gt_hook", "--no-progress"]) == 0
    g = {os.path.basename(v["path"]): v["ground_truth"] for v in strict_json(gt_out / "results.json")["videos"]}
    assert g["c_static.mp4"]["psnr_vde"] < 0.05 and g["a_steady.mp4"]["chunk_psnr"][-1] < 20  # panned away
    assert g["a_steady.mp4"]["final_position_error"] == pytest.approx(2 * np.sqrt(2))
    assert "Ground truth (simulator)" in (gt_out / "report.html").read_text()
    with pytest.raises(SystemExit):
        main(["eval", str(videos), "--out", str(out), "--metrics", "sharpness"])
    assert main(["eval", str(tmp_path / "empty_dir_missing"), "--out", str(out), "--no-progress"]) == 1
    assert main(["eval", str(videos), "--out", str(out), "--backend", "reference", "--metrics", "subject",
                 "--no-progress"]) == 2
    assert "dino-vitb16" in capsys.readouterr().err


def test_out_must_be_a_folder_checked_before_any_work(videos, tmp_path, capsys, monkeypatch):
    import inferix.lvbench.cli as cli

    def no_work(*a, **k):
        pytest.fail("videos were evaluated before --out was checked")

    monkeypatch.setattr(cli, "evaluate_videos", no_work)
    monkeypatch.setattr(cli, "run_benchmark", no_work)
    f = tmp_path / "results"
    f.write_text("keep me")
    cases = [(["eval", str(videos / "a_steady.mp4"), "--out", str(f)], f"--out {f} exists and is not a folder"),
             (["eval", str(videos), "--out", str(f / "sub")], f"--out {f / 'sub'}: {f} is a file, not a folder"),
             (["run", "--model", "tiny", "--frames", "8", "--out", str(f)], f"--out {f} exists and is not a folder")]
    for argv, want in cases:
        assert main(argv + ["--no-progress"], engine=FakeEngine()) == 2
        captured = capsys.readouterr()
        assert captured.err == f"lvbench: error: {want}\n" and not captured.out
    assert f.read_text() == "keep me"
    with pytest.raises(SystemExit):
        main(["eval", str(videos), "--out", str(tmp_path / "o"), "--max-memory-gib", "0"])
    assert "--max-memory-gib: must be > 0" in capsys.readouterr().err


def test_process_pool_matches_threads(videos):
    paths = [str(videos / "a_steady.mp4"), str(videos / "e_corrupt.mp4"), str(videos / "b_blurring.mp4")]
    cfg = EvalConfig(metrics=["clarity", "motion"])
    threads = evaluate_videos(paths, cfg, workers=2, progress=False)
    procs = evaluate_videos(paths, cfg, workers=2, executor="process", progress=False)
    assert [r["status"] for r in procs] == ["ok", "failed", "ok"]
    for a, b in zip(threads, procs):
        assert a["metrics"] == b["metrics"]


def test_read_video_downscales_long_side(videos):
    v = read_video(str(videos / "a_steady.mp4"), max_side=32)
    assert v.frames.shape == (40, 24, 32, 3) and v.native_size == (48, 64) and v.fps == 8


# ------------------------------------------------------------------------------------------------ run
class FakeEngine:
    """Stands in for inferix.Engine: yields [4, 48, 64, 3] blocks whose scene follows the active prompt."""

    fps = 8

    def __init__(self, fail_on=None):
        self.calls = []
        self.fail_on = fail_on

    def generate(self, prompt, num_frames, seed=0, prompt_schedule=None):
        self.calls.append({"prompt": prompt, "num_frames": num_frames, "seed": seed, "schedule": prompt_schedule})
        if self.fail_on and self.fail_on in prompt:
            raise RuntimeError("out of memory (simulated)")
        starts = [s for s, _ in prompt_schedule]
        scenes = {s: texture(48, 64 + num_frames, seed=hash(p) % 1000) for s, p in prompt_schedule}
        for t0 in range(0, num_frames, 4):
            block = []
            for t in range(t0, min(t0 + 4, num_frames)):
                active = max(s for s in starts if s <= t)
                block.append(scenes[active][:, t: t + 64])
            yield np.stack(block)


def test_run_with_fake_engine(tmp_path, capsys):
    eng = FakeEngine(fail_on="golden retriever")
    out = tmp_path / "run"
    rc = main(["run", "--model", "tiny", "--frames", "30", "--out", str(out), "--metrics", "clarity,subject",
               "--no-progress", "--seed", "7"], engine=eng)
    assert rc == 1  # one prompt failed to generate
    items = load_prompts(SAMPLE_PROMPTS)
    assert len(eng.calls) == len(items)
    call = eng.calls[0]
    assert call["num_frames"] == 30 and call["seed"] == 7
    assert call["schedule"] == [(0, items[0]["captions"][0]), (10, items[0]["captions"][1]),
                                (20, items[0]["captions"][2])]
    doc = strict_json(out / "results.json")
    assert doc["config"]["model"] == "tiny" and doc["config"]["frames"] == 30
    st = {v["video_id"]: v for v in doc["videos"]}
    assert st["sample_dog_beach"]["status"] == "failed"
    assert "out of memory" in st["sample_dog_beach"]["reason"]
    ok = st["sample_dancer_street"]
    assert ok["status"] == "ok" and ok["num_frames"] == 30 and ok["captions"] == items[0]["captions"]
    assert os.path.isfile(ok["path"]) and not os.path.exists(st["sample_dog_beach"]["path"])
    assert ok["prompt_schedule"][1] == [10, items[0]["captions"][1]]
    # prompt switches are scene changes, so subject drift is clearly non-zero
    assert ok["metrics"]["subject"]["vde"] > 0.5


def test_run_benchmark_ground_truth_hook(tmp_path):
    gt_store = {}

    class Recorder(FakeEngine):
        def generate(self, prompt, num_frames, seed=0, prompt_schedule=None):
            for b in super().generate(prompt, num_frames, seed, prompt_schedule):
                gt_store.setdefault(prompt, []).append(b)
                # the "model" darkens over time, so it drifts from the simulator
                yield (b * (1.0 - 0.02 * len(gt_store[prompt]))).astype(np.uint8)

    from inferix.lvbench.groundtruth import ground_truth_drift

    def hook(frames, item):
        gt = np.concatenate(gt_store[item["captions"][0]])
        pos = np.zeros((len(gt), 2))
        return ground_truth_drift(frames, gt, pos, pred_positions=pos + 1.0, num_chunks=10)

    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"v1": ["a scene", "another scene"]}))
    recs = run_benchmark("toyworld", str(prompts), 40, str(tmp_path / "o"), EvalConfig(metrics=["clarity"]),
                         engine=Recorder(), ground_truth=hook, progress=False)
    g = recs[0]["ground_truth"]
    assert len(g["chunk_psnr"]) == 10 and g["chunk_psnr"][0] > g["chunk_psnr"][-1]
    assert g["chunk_position_error"] == pytest.approx([1.0 * np.sqrt(2)] * 10)
    from inferix.lvbench.report import write_results
    from inferix.lvbench.runner import summarize

    write_results(str(tmp_path / "o"), recs, {"metrics": ["clarity"], "num_chunks": 10}, summarize(recs, ["clarity"]))
    html = (tmp_path / "o" / "report.html").read_text()
    assert "Ground truth (simulator)" in html and "_psnr.png" in html and "_position.png" in html


def test_prompt_manifests(tmp_path):
    assert prompt_schedule(["a", "b", "c"], 10) == [(0, "a"), (3, "b"), (6, "c")]
    with pytest.raises(ValueError, match="cannot hold"):
        prompt_schedule(["a", "b", "c"], 2)
    j = tmp_path / "m.json"
    j.write_text(json.dumps([{"id": "x", "captions": [{"caption": "c1"}, {"text": "c2"}], "seed": 3},
                             {"prompt": "single"}]))
    assert load_prompts(str(j)) == [{"video_id": "x", "captions": ["c1", "c2"], "seed": 3},
                                    {"video_id": "prompt_0001", "captions": ["single"]}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"video_id": "a", "captions": ["x"]}\n{"video_id": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no 'captions'"):
        load_prompts(str(bad))
    bad.write_text('{"video_id": "a", "captions": ["x"]}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        load_prompts(str(bad))
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"video_id": "a", "captions": ["x"]}\n{"video_id": "a", "captions": ["y"]}\n')
    with pytest.raises(ValueError, match="duplicate video_id 'a'"):
        load_prompts(str(dup))
    with pytest.raises(FileNotFoundError):
        load_prompts(str(tmp_path / "none.jsonl"))
