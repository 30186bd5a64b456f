"""``lvbench``: evaluate videos with VDE, or generate LV-Bench prompts with the engine and evaluate them.

  lvbench eval VIDEO_OR_DIR... --out DIR [--metrics clarity,motion,...] [--chunks 10] [--backend auto]
               [--weights DIR] [--workers 4] [--executor thread|process] [--max-memory-gib 4]
  lvbench run --model PATH_OR_PRESET [--prompts FILE.jsonl] --frames N --out DIR [eval options]

Both write DIR/results.json, DIR/results.csv, DIR/report.html and DIR/plots/. Exit status: 0 when every
video was evaluated, 1 when some failed (their reasons are in the results), 2 on bad arguments.
Videos are decoded and scored frame by frame; one whose estimated memory exceeds --max-memory-gib (a whole
video is held only for a --ground-truth hook) fails before it is decoded.
"""
from __future__ import annotations

import argparse
import os
import sys

from inferix.drift import DEFAULT_NUM_CHUNKS, METRIC_NAMES

from .backends import BACKEND_CHOICES
from .report import write_results
from .runner import DEFAULT_MAX_MEMORY_GIB, SAMPLE_PROMPTS, EvalConfig, evaluate_videos, run_benchmark, summarize
from .video import find_videos


def _metrics(s: str) -> list[str]:
    names = [m.strip() for m in s.split(",") if m.strip()]
    if names == ["all"]:
        return list(METRIC_NAMES)
    bad = [m for m in names if m not in METRIC_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {bad or '[]'}; choose from {','.join(METRIC_NAMES)}")
    return names


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _out_dir_problem(out: str) -> str | None:
    """Why ``out`` cannot be the output folder (None when it can): checked before any video is decoded."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out} exists and is not a folder"
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"--out {out}: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out}: {parent} is not writable"
    return None


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--metrics", type=_metrics, default=list(METRIC_NAMES),
                   help=f"comma-separated subset of {','.join(METRIC_NAMES)} (default: all)")
    p.add_argument("--chunks", type=_positive, default=DEFAULT_NUM_CHUNKS, help="chunks per video (default 10)")
    p.add_argument("--weighting", choices=("linear", "log"), default="linear", help="VDE weights (default linear)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="auto: reference models where --weights has them, weight-free otherwise")
    p.add_argument("--weights", default=None, help="folder with the reference models (see lvbench.backends)")
    p.add_argument("--device", default="cpu", help="torch device for reference models (default cpu)")
    p.add_argument("--workers", type=_positive, default=1, help="videos evaluated in parallel")
    p.add_argument("--executor", choices=("thread", "process"), default="thread")
    p.add_argument("--max-side", type=int, default=512,
                   help="decode frames at this long side at most (0 = native; the protocol's clarity uses 512)")
    p.add_argument("--max-memory-gib", type=_positive_float, default=DEFAULT_MAX_MEMORY_GIB,
                   help="refuse a video whose estimated memory to score exceeds this, per worker "
                        f"(default {DEFAULT_MAX_MEMORY_GIB:g}); videos are decoded frame by frame")
    p.add_argument("--ground-truth", default=None, metavar="MODULE:FUNCTION",
                   help="hook returning simulator PSNR / position drift (see lvbench.groundtruth)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvbench", description="LV-Bench Video Drift Error evaluation")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("eval", help="evaluate existing videos")
    e.add_argument("inputs", nargs="+", metavar="VIDEO_OR_DIR")
    _add_eval_options(e)
    r = sub.add_parser("run", help="generate prompts with the engine, then evaluate")
    r.add_argument("--model", required=True, help="checkpoint path or preset (e.g. tiny, toyworld)")
    r.add_argument("--prompts", default=SAMPLE_PROMPTS,
                   help="JSONL/JSON manifest of {video_id, captions[...]} (default: the bundled sample)")
    r.add_argument("--frames", type=_positive, required=True, help="pixel frames per video")
    r.add_argument("--seed", type=int, default=0)
    _add_eval_options(r)
    return p


def _config(args) -> EvalConfig:
    return EvalConfig(metrics=args.metrics, num_chunks=args.chunks, weighting=args.weighting,
                      backend=args.backend, weights_dir=args.weights, device=args.device, max_side=args.max_side,
                      max_memory_gib=args.max_memory_gib)


def _print_summary(records, summary, metrics, out_dir, file=None) -> None:
    file = file or sys.stdout
    ok = sum(r["status"] == "ok" for r in records)
    print(f"lvbench: {ok}/{len(records)} videos evaluated -> {out_dir}", file=file)
    for m in metrics:
        s = summary[m]
        mean = "n/a" if s["mean_vde"] is None else f"{s['mean_vde']:.4f}"
        inf = f" ({s['infinite']} inf)" if s["infinite"] else ""
        print(f"  {m:<11} VDE mean {mean}{inf}  [{', '.join(s['backends'])}]", file=file)
    for r in records:
        if r["status"] != "ok":
            reason = str(r["reason"])
            print(f"  FAILED {reason if reason.startswith(r['path']) else r['path'] + ': ' + reason}", file=file)


def main(argv=None, engine=None) -> int:
    """Entry point. ``engine`` replaces the engine ``run`` would load (used by tests)."""
    args = build_parser().parse_args(argv)
    problem = _out_dir_problem(args.out)
    if problem:
        print(f"lvbench: error: {problem}", file=sys.stderr)
        return 2
    try:
        cfg = _config(args)
        if args.command == "eval":
            paths = find_videos(args.inputs)
            if not paths:
                print(f"lvbench: no videos found in {args.inputs}", file=sys.stderr)
                return 2
            records = evaluate_videos(paths, cfg, workers=args.workers, executor=args.executor,
                                      ground_truth=args.ground_truth, progress=not args.no_progress)
            extra = {}
        else:
            hook = None
            if args.ground_truth:
                from .groundtruth import load_hook

                hook = load_hook(args.ground_truth)
            records = run_benchmark(args.model, args.prompts, args.frames, args.out, cfg, seed=args.seed,
                                    device=args.device, engine=engine, ground_truth=hook,
                                    progress=not args.no_progress)
            extra = {"model": args.model, "prompts": os.path.abspath(args.prompts), "frames": args.frames,
                     "seed": args.seed}
    except (ValueError, FileNotFoundError) as e:
        print(f"lvbench: error: {e}", file=sys.stderr)
        return 2
    summary = summarize(records, cfg.metrics)
    config = {"command": args.command, "metrics": cfg.metrics, "num_chunks": cfg.num_chunks,
              "weighting": cfg.weighting, "backend": cfg.backend, "weights": cfg.weights_dir,
              "device": cfg.device, "max_side": cfg.max_side, "max_memory_gib": cfg.max_memory_gib,
              "workers": args.workers, **extra}
    write_results(args.out, records, config, summary)
    _print_summary(records, summary, cfg.metrics, args.out)
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
