"""``inferix toyworld eval``: the toy world model through the engine against its simulator.

Same start frames and same actions as the simulator; writes metrics JSON, a drift-curve PNG and a strip of frames,
and measures speed through the engine (pixel frames/s including decode, time to first frame).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["main", "evaluate", "evaluate_from_truth", "evaluate_suite", "suite_table", "seed_range_episodes", "SUITE"]

# The standard episodes (seed, prompt) of ``--suite``: every theme on the default seed, then ten more seeds.
SUITE: tuple[tuple[int, str], ...] = (
    (12345, "a red cube in a snowy field"), (12345, "a cube in the desert"), (12345, "a cube on the grass"),
    (12345, "a cube in the forest"), (12345, "a cube at night"),
    (7, "a cube on the grass"), (8, "a cube at night"), (9, "a cube on the grass"), (10, "a cube at night"),
    (11, "a red cube in a snowy field"), (12, "a cube in the desert"), (13, "a cube in the forest"),
    (14, "a cube at night"), (15, "a cube on the grass"), (16, "a cube at night"),
)


def evaluate(*, frames: int, out: Path, seed: int = 12345, prompt: str = "a red cube in a snowy field",
             context: int = 8, model: str = "toyworld", threads: int | None = None, window: int = -1,
             sink: int | None = None, positions: str = "auto", save_frames: bool = False, engine=None,
             mirrors: tuple = (), corrector: bool | None = None) -> dict:
    """One rollout of ``frames`` frames against the simulator; writes metrics.json, drift.png, strip.png to out.
    ``engine``: an Engine to reuse (then model, window, sink and positions are its own)."""
    from inferix.models.toyworld import simulator as sim
    from inferix.models.toyworld.metrics import drift_curve_png, eval_episode, rollout_metrics, strip_png
    if threads:
        torch.set_num_threads(threads)
    eng = engine if engine is not None else _engine(model, window, sink, positions, mirrors, corrector)
    if context % eng.block_frames:
        raise ValueError(f"--context {context} must be a multiple of the block ({eng.block_frames} frames)")
    acts, true, pos = eval_episode(seed, prompt, context + frames)
    t0 = time.perf_counter()
    gen, t_first = [], None
    from tqdm import tqdm
    bar = tqdm(total=frames, unit="frame", desc="toy world rollout")
    for blk in eng.generate(prompt, num_frames=frames, seed=seed, init_frames=true[:context] if context else None,
                            actions=[int(a) for a in acts[context:]]):
        if t_first is None:
            t_first = time.perf_counter() - t0
        gen.append(blk)
        bar.update(len(blk))
    bar.close()
    total = time.perf_counter() - t0
    gen = np.concatenate(gen)
    m = rollout_metrics(gen, true[context:], pos[context:], true[:context])
    m["summary"].update({
        "engine": True, "model": model, "prompt": prompt, "theme": sim.theme_of(prompt), "seed": seed,
        "context_frames": context, "window": eng.window, "sink": eng.sink, "positions": eng.positions,
        "mirrors": list(eng.mirrors), "corrector": eng.corrector,
        "threads": torch.get_num_threads(),
        "time_to_first_frame_s": t_first,
        "time_to_first_frame_note": "from the request to the first decoded block, context commit included",
        "pixel_fps_including_decode": frames / total, "total_s": total,
    })
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(m, indent=1))
    drift_curve_png(m, out / "drift.png", title=f"toy world via engine, {frames} frames, {prompt!r}, seed {seed}")
    cols = [c for c in (0, 4, 8, 16, 32, 64, 128, 256, 512, 999) if c < frames]
    strip_png([("truth", true[context:]), ("model", gen)], cols, out / "strip.png")
    if save_frames:
        np.savez_compressed(out / "frames.npz", gen=gen, true=true[context:], positions=pos[context:])
    return m


THEME_PROMPTS = ("a red cube in a snowy field", "a cube in the desert", "a cube on the grass", "a cube in the forest",
                 "a cube at night")


def seed_range_episodes(spec: str) -> list[tuple[int, str]]:
    """'A-B' (or one seed 'A'): seeds A..B, the i-th with the i-th of the five theme prompts, cycling."""
    try:
        lo, _, hi = spec.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"seed range must look like 17-26 or 17, got {spec!r}") from None
    if hi < lo:
        raise ValueError(f"seed range {spec!r} ends before it starts")
    return [(s, THEME_PROMPTS[i % len(THEME_PROMPTS)]) for i, s in enumerate(range(lo, hi + 1))]


def _engine(model: str, window: int = -1, sink: int | None = None, positions: str = "auto", mirrors: tuple = (),
            corrector: bool | None = None):
    from inferix.engine import Engine
    return Engine.from_pretrained(model, device="cpu", max_sessions=1, window=window, sink=sink, positions=positions,
                                  mirrors=mirrors, corrector=corrector)


def _episode_dir(seed: int, prompt: str) -> str:
    from inferix.models.toyworld import simulator as sim
    return f"seed{seed}_{sim.theme_of(prompt)}"


def evaluate_suite(*, frames: int, out: Path, episodes=SUITE, context: int = 8, model: str = "toyworld",
                   threads: int | None = None, window: int = -1, sink: int | None = None,
                   positions: str = "auto", save_frames: bool = False, mirrors: tuple = (),
                   corrector: bool | None = None) -> dict:
    """``evaluate`` on several episodes (seed, prompt) with one engine: each episode's files go to
    out/seed<S>_<theme>/, and out/suite.json holds a row per episode and how many episodes meet each target."""
    from tqdm import tqdm
    episodes = [(int(s), str(p)) for s, p in episodes]
    if not episodes:
        raise ValueError("the suite needs at least one (seed, prompt) episode")
    names = [_episode_dir(s, p) for s, p in episodes]
    if len(set(names)) != len(names):
        raise ValueError(f"episodes repeat a (seed, theme): {sorted(n for n in names if names.count(n) > 1)}")
    if threads:
        torch.set_num_threads(threads)
    eng = _engine(model, window, sink, positions, mirrors, corrector)
    rows = []
    for (seed, prompt), name in zip(tqdm(episodes, desc="suite episodes", unit="episode"), names):
        s = evaluate(frames=frames, out=out / name, seed=seed, prompt=prompt, context=context,
                     save_frames=save_frames, engine=eng)["summary"]
        beaten = sum(m > max(a, b) for m, a, b in zip(s["psnr_per_32"], s["psnr_copy_last_per_32"],
                                                      s["psnr_context_mean_per_32"]))
        rows.append({"dir": name, "seed": seed, "prompt": prompt, "theme": s["theme"],
                     "agent_error_median_px": s["agent_error_median_px"], "agent_found_share": s["agent_found_share"],
                     "palette_share_min_window": s["palette_share_min_window"],
                     "psnr_windows_beating_both": int(beaten), "psnr_windows": len(s["psnr_per_32"]),
                     "ball_found_share": s["ball_found_share"],
                     "pixel_fps_including_decode": s["pixel_fps_including_decode"],
                     "time_to_first_frame_s": s["time_to_first_frame_s"], "targets": s["targets"]})
    agent = [r["agent_error_median_px"] for r in rows]
    summary = {
        "episodes": len(rows), "frames": frames, "model": model, "context_frames": context,
        "mirrors": list(mirrors), "corrector": eng.corrector,
        "episodes_meeting": {k: sum(r["targets"][k] for r in rows) for k in rows[0]["targets"]},
        "episodes_meeting_all_targets": sum(all(r["targets"].values()) for r in rows),
        "agent_error_median_px_mean": float(np.mean(agent)), "agent_error_median_px_max": float(np.max(agent)),
        "palette_share_min_window_worst": min(r["palette_share_min_window"] for r in rows),
        "psnr_windows_beating_both": sum(r["psnr_windows_beating_both"] for r in rows),
        "psnr_windows": sum(r["psnr_windows"] for r in rows),
        "pixel_fps_including_decode_range": [min(r["pixel_fps_including_decode"] for r in rows),
                                             max(r["pixel_fps_including_decode"] for r in rows)],
        "note": "targets per episode as in metrics.json: the palette target needs 1,000+ frames and the PSNR one "
                "256+, so shorter episodes never meet them",
    }
    res = {"summary": summary, "per_episode": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(res, indent=1))
    return res


def suite_table(res: dict) -> str:
    """suite.json as a Markdown table, one row per episode, and a last line with the counts."""
    lines = ["| seed | prompt | agent median | palette, worst window | PSNR windows beating both | targets met |",
             "|---|---|---|---|---|---|"]
    for r in res["per_episode"]:
        lines.append(f"| {r['seed']} | {r['prompt']} | {r['agent_error_median_px']:.2f} px | "
                     f"{100 * r['palette_share_min_window']:.1f}% | {r['psnr_windows_beating_both']} of "
                     f"{r['psnr_windows']} | {sum(r['targets'].values())} of {len(r['targets'])} |")
    s = res["summary"]
    met = ", ".join(f"{k} {v}" for k, v in s["episodes_meeting"].items())
    lines.append(f"\n{s['episodes']} episodes of {s['frames']} frames; episodes meeting each target: {met}; all "
                 f"three: {s['episodes_meeting_all_targets']}. Agent median: mean {s['agent_error_median_px_mean']:.2f}"
                 f" px, worst {s['agent_error_median_px_max']:.2f} px.")
    return "\n".join(lines)


def evaluate_from_truth(*, blocks: int, out: Path, seed: int = 12345, prompt: str = "a red cube in a snowy field",
                        context: int = 8, model: str = "toyworld", threads: int | None = None,
                        corrector: bool | None = None) -> dict:
    """One block at a time from TRUE context: block i is generated after the simulator's first context + i * bf
    frames (through the engine, trimmed to the model's window and sink as always). This separates the model's
    one-block error from the drift of a rollout on its own frames; blocks where the ball bounces are reported apart.
    """
    from inferix.models.toyworld import simulator as sim
    from inferix.models.toyworld.metrics import detect_color, eval_episode
    from inferix.engine import Engine
    if threads:
        torch.set_num_threads(threads)
    eng = Engine.from_pretrained(model, device="cpu", max_sessions=1, corrector=corrector)
    bf = eng.block_frames
    if context <= 0 or context % bf:
        raise ValueError(f"--context {context} must be a positive multiple of the block ({bf} frames)")
    n = context + blocks * bf
    acts, true, pos = eval_episode(seed, prompt, n)
    _, bounced = sim.World(seed, prompt).ball_path(n)
    true_ball = detect_color(true, sim.BALL_COLOR, tol=10.0, min_pixels=1)
    from tqdm import tqdm

    def worst(e):  # a block's worst frame; frames where the object is not found are left out
        return None if np.isnan(e).all() else float(np.nanmax(e))
    rows, agent_errors = [], []  # agent_errors: each block's per-frame errors, NaN where the agent is not found
    for i in tqdm(range(blocks), desc="blocks from true context", unit="block"):
        k = context + i * bf
        blk = next(iter(eng.generate(prompt, num_frames=bf, seed=seed + i, init_frames=true[:k],
                                     actions=[int(a) for a in acts[k:k + bf]])))
        ball = np.linalg.norm(detect_color(blk, sim.BALL_COLOR) - true_ball[k:k + bf], axis=1)
        agent = np.linalg.norm(detect_color(blk, sim.AGENT_COLOR) - pos[k:k + bf], axis=1)
        rows.append({"first_frame": k, "bounce": bool(bounced[k:k + bf].any()),
                     "ball_error_max_px": worst(ball), "ball_found_frames": int((~np.isnan(ball)).sum()),
                     "agent_error_max_px": worst(agent), "agent_found_frames": int((~np.isnan(agent)).sum()),
                     "agent_error_px": [None if np.isnan(e) else float(e) for e in agent]})
        agent_errors.append(agent)

    def by_frame(bounce):  # mean agent error of the block's k-th frame (does the error grow within a block?)
        e = np.array([a for a, r in zip(agent_errors, rows) if r["bounce"] == bounce])
        return [None if e.size == 0 or np.isnan(e[:, k]).all() else float(np.nanmean(e[:, k])) for k in range(bf)]

    def median(key, bounce):
        v = [r[key] for r in rows if r["bounce"] == bounce and r[key] is not None]
        return float(np.median(v)) if v else None
    summary = {"blocks": blocks, "block_frames": bf, "bounce_blocks": sum(r["bounce"] for r in rows),
               "ball_error_max_px_median": {"bounce": median("ball_error_max_px", True),
                                            "no_bounce": median("ball_error_max_px", False)},
               "agent_error_max_px_median": {"bounce": median("agent_error_max_px", True),
                                             "no_bounce": median("agent_error_max_px", False)},
               "agent_error_px_mean_by_frame_in_block": {"bounce": by_frame(True), "no_bounce": by_frame(False)},
               "note": "per block: the worst frame's error; a frame where the object is not found is left out "
                       "(see *_found_frames)",
               "model": model, "prompt": prompt, "seed": seed, "context_frames": context,
               "corrector": eng.corrector}
    res = {"summary": summary, "per_block": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "from_truth.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="inferix toyworld eval",
                                 description="Roll the toy world model out through the engine and compare it "
                                             "with the simulator (same start frames, same actions).")
    ap.add_argument("what", choices=["eval"])
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=None, help="episode seed (default 12345)")
    ap.add_argument("--prompt", default=None, help="picks the theme (default: a red cube in a snowy field)")
    ap.add_argument("--suite", action="store_true",
                    help=f"the {len(SUITE)} standard episodes (every theme on seed 12345, then seeds 7-16) with "
                         "one engine: a folder per episode and suite.json with the counts per target")
    ap.add_argument("--context", type=int, default=8, help="true frames given as context (whole blocks)")
    ap.add_argument("--model", default="toyworld")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--window", type=int, default=-1, help="latent frames attended (default: the model's)")
    ap.add_argument("--sink", type=int, default=None, help="pinned first frames (default: the model's)")
    ap.add_argument("--positions", default="auto", choices=["auto", "absolute", "relative"])
    ap.add_argument("--save-frames", action="store_true",
                    help="also write frames.npz (generated and true uint8 frames, true agent positions)")
    ap.add_argument("--from-truth", type=int, default=0, metavar="BLOCKS",
                    help="instead of a rollout: BLOCKS single blocks, each generated from the simulator's frames "
                         "before it (one-block error, bounce blocks apart); writes from_truth.json")
    ap.add_argument("--mirrors", default="", help="comma-separated mirror views (h, v, hv, d, a) run beside the world "
                                                   "and averaged every block")
    ap.add_argument("--suite-seeds", default=None, metavar="A-B",
                    help="a suite of other episodes: seeds A..B, cycling through the five themes' prompts")
    ap.add_argument("--corrector", choices=["auto", "on", "off"], default="auto",
                    help="the model's action corrector: auto runs it if the model has one and no mirror views run")
    a = ap.parse_args(argv)
    from inferix.models.corrector import CORRECTOR_MODES
    corrector = CORRECTOR_MODES[a.corrector]
    from inferix.models.mirrors import parse_mirrors
    try:
        mirrors = parse_mirrors(a.mirrors)
    except ValueError as e:
        ap.error(f"--mirrors: {e}")
    if mirrors and a.from_truth:
        ap.error("--mirrors applies to rollouts, not to --from-truth")
    if a.frames <= 0:
        ap.error(f"--frames must be positive, got {a.frames}")
    if a.from_truth < 0:
        ap.error(f"--from-truth must be positive, got {a.from_truth}")
    if a.suite or a.suite_seeds:
        if a.from_truth or a.seed is not None or a.prompt is not None:
            ap.error("--suite runs its own seeds and prompts: leave out --seed, --prompt and --from-truth")
        try:
            episodes = seed_range_episodes(a.suite_seeds) if a.suite_seeds else SUITE
        except ValueError as e:
            ap.error(f"--suite-seeds: {e}")
        r = evaluate_suite(frames=a.frames, out=Path(a.out), episodes=episodes, context=a.context, model=a.model,
                           threads=a.threads, window=a.window, sink=a.sink, positions=a.positions,
                           save_frames=a.save_frames, mirrors=mirrors, corrector=corrector)
        print(suite_table(r))
        print(f"wrote {Path(a.out) / 'suite.json'} and a folder per episode")
        return 0
    a.seed = 12345 if a.seed is None else a.seed
    a.prompt = "a red cube in a snowy field" if a.prompt is None else a.prompt
    if a.from_truth:
        r = evaluate_from_truth(blocks=a.from_truth, out=Path(a.out), seed=a.seed, prompt=a.prompt,
                                context=a.context, model=a.model, threads=a.threads, corrector=corrector)
        print(json.dumps(r["summary"], indent=1))
        print(f"wrote {Path(a.out) / 'from_truth.json'}")
        return 0
    m = evaluate(frames=a.frames, out=Path(a.out), seed=a.seed, prompt=a.prompt, context=a.context, model=a.model,
                 threads=a.threads, window=a.window, sink=a.sink, positions=a.positions,
                 save_frames=a.save_frames, mirrors=mirrors, corrector=corrector)
    s = m["summary"]
    keys = ("agent_error_median_px", "agent_found_share", "palette_share_min_window", "psnr_per_32",
            "psnr_copy_last_per_32", "psnr_context_mean_per_32", "pixel_fps_including_decode",
            "time_to_first_frame_s", "targets")
    print(json.dumps({k: s.get(k) for k in keys}, indent=1))
    print(f"wrote {Path(a.out) / 'metrics.json'}, drift.png and strip.png")
    return 0
