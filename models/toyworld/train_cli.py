"""``inferix train toyworld`` (also ``python -m inferix.models.toyworld.train``): the command line and the training
loop around ``train.Trainer`` (arguments, resume and init, time budget, progress, checkpoints, export)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .data import BatchPrefetcher
from .export import export_bundle
from .train import __doc__ as TRAIN_DOC, TrainConfig, Trainer

__all__ = ["main"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="inferix train toyworld", description=TRAIN_DOC.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000, help="total optimizer steps (also sets the cosine schedule)")
    ap.add_argument("--out", default="runs/toyworld", help="directory for checkpoints and the exported bundle")
    ap.add_argument("--resume", default=None, help="checkpoint directory to continue from")
    ap.add_argument("--init", default=None,
                    help="checkpoint directory, exported bundle .json or 'toyworld' (the shipped weights) whose EMA "
                         "weights (and config) start a new run: step 0, fresh optimizer and schedule (fine-tuning)")
    ap.add_argument("--rollout-p", type=float, default=None,
                    help="share of batches whose context is the model's own rollout (self-forcing fine-tuning)")
    ap.add_argument("--rollout-max-blocks", type=int, default=None,
                    help="rollout depth before the clip, uniform in [1, N] blocks (default 6)")
    ap.add_argument("--warmup", type=int, default=None, help="learning-rate warm-up steps")
    ap.add_argument("--sink-blocks", type=int, default=None,
                    help="train on the engine's sink layout: this many blocks from each episode's start, then the "
                         "rest of the clip from a later frame (0: contiguous clips)")
    ap.add_argument("--clip-blocks", type=int, default=None, help="blocks per training clip (the inference window)")
    ap.add_argument("--p-no-gap", type=float, default=None, help="with a sink: share of clips without a gap")
    ap.add_argument("--dynamic-weight", type=float, default=None,
                    help="extra loss weight on pixels where the agent or the ball is or just was (default 4)")
    ap.add_argument("--bounce-p", type=float, default=None,
                    help="share of clips picked so that the ball bounces off the wall in their last block (default 0)")
    ap.add_argument("--bounce-blocks", type=int, default=None,
                    help="with --bounce-p: the bounce falls in one of the clip's last N blocks (default 1, the target "
                         "block; more puts it in the context too, which rollout batches generate)")
    ap.add_argument("--p-sigma-one", type=float, default=None,
                    help="share of target blocks at pure noise, the first denoising step (default 0.4; 1.0 trains "
                         "only the step a one-step sampler uses)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--workers", type=int, default=0,
                    help="processes that simulate the next batches ahead (same batches as without; useful on a GPU)")
    ap.add_argument("--checkpoint-every", type=float, default=240.0, help="seconds between checkpoints")
    ap.add_argument("--config", default=None, help="JSON file with TrainConfig fields (e.g. a micro model)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="training-time budget: the lr schedule also follows it and training stops (checkpoint, "
                         "export) when it is spent; without it the run is step-based and exactly reproducible")
    ap.add_argument("--export-only", action="store_true",
                    help="with --resume: write the bundle of that checkpoint's EMA weights to --out, no training")
    args = ap.parse_args(argv)
    if args.export_only and not args.resume:
        ap.error("--export-only needs --resume CHECKPOINT_DIR")
    if args.init and args.resume:
        ap.error("--init starts a new run from a checkpoint; --resume continues one: give only one")
    if args.threads:
        torch.set_num_threads(args.threads)

    fields = json.loads(Path(args.config).read_text()) if args.config else {}
    if args.init == "toyworld":  # the shipped bundle
        from ..bundle import WEIGHTS_DIR
        args.init = str(WEIGHTS_DIR / "toyworld.json")
    if args.init and Path(args.init).suffix == ".json":
        if not Path(args.init).exists():
            raise FileNotFoundError(f"bundle {args.init} does not exist")
        meta = json.loads(Path(args.init).read_text())
        if "config" not in meta.get("train", {}):
            raise KeyError(f"bundle {args.init} has no train.config (not exported by this trainer)")
        fields = {**meta["train"]["config"], **fields, "seed": args.seed}
    elif args.resume or args.init:
        state_path = Path(args.resume or args.init) / "state.json"
        if not state_path.exists():
            raise FileNotFoundError(f"checkpoint {state_path.parent} has no state.json")
        state = json.loads(state_path.read_text())
        fields = {**state["config"], **fields}
        if args.init:
            fields["seed"] = args.seed  # a new run: its own batches
    fields.update(steps=args.steps if not (args.export_only and args.resume) else fields.get("steps", args.steps),
                  seed=args.seed if not args.resume else fields.get("seed", args.seed),
                  checkpoint_every_s=args.checkpoint_every)
    if args.batch:
        fields["batch"] = args.batch
    if args.lr:
        fields["lr"] = args.lr
    for name in ("rollout_p", "rollout_max_blocks", "warmup", "sink_blocks", "clip_blocks", "p_no_gap",
                 "dynamic_weight", "bounce_p", "bounce_blocks", "p_sigma_one"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    cfg = TrainConfig.from_dict(fields, what="train config")
    tr = Trainer(cfg, device=args.device)
    if args.resume:
        tr.load(Path(args.resume), optimizer=not args.export_only)  # exporting needs the weights only
    if args.init:
        tr.init_from(Path(args.init))
    if args.export_only:
        last = tr.history[-1]["loss_ema"] if tr.history else None
        path = export_bundle(tr, Path(args.out) / "toyworld.json", final_loss=last)
        print(f"exported {path} and {path.with_suffix('.safetensors')} (step {tr.step})", flush=True)
        return 0
    if args.max_minutes is not None:
        tr.time_budget_s = 60 * args.max_minutes
    out = Path(args.out)
    from tqdm import tqdm
    if tr.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # a 2 M-parameter model: fp32 storage, tf32 products
        torch.backends.cudnn.allow_tf32 = True

    n_params = sum(p.numel() for p in tr.dit.parameters())
    print(f"toyworld: {n_params / 1e6:.2f} M DiT params, device {args.device}, threads {torch.get_num_threads()}, "
          f"steps {tr.step} -> {cfg.steps}, rollout_p {cfg.rollout_p}, workers {args.workers}", flush=True)
    bar = tqdm(total=cfg.steps, initial=tr.step, desc="toyworld", mininterval=10.0, dynamic_ncols=True)
    prefetch = BatchPrefetcher(cfg, args.workers) if args.workers > 0 else None
    try:
        _train_loop(tr, cfg, args, out, bar, prefetch)
    finally:
        if prefetch is not None:
            prefetch.close()
    bar.close()
    tr.save(out)
    path = export_bundle(tr, out / "toyworld.json", final_loss=tr.history[-1]["loss_ema"] if tr.history else None)
    print(f"exported {path} and {path.with_suffix('.safetensors')}", flush=True)
    return 0


def _train_loop(tr: Trainer, cfg: TrainConfig, args, out: Path, bar, prefetch: BatchPrefetcher | None) -> None:
    from tqdm import tqdm
    last_ckpt = time.time()
    loss_ema = ro_ema = None
    while tr.step < cfg.steps:
        t0 = time.time()
        info = tr.train_step(prefetch.get(tr.step) if prefetch is not None else None)
        dt = time.time() - t0
        tr.wall += dt
        loss_ema = info["loss"] if loss_ema is None else 0.95 * loss_ema + 0.05 * info["loss"]
        if info["rollout"]:  # loss on the model's own context, tracked apart (it starts higher)
            ro_ema = info["loss"] if ro_ema is None else 0.9 * ro_ema + 0.1 * info["loss"]
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.4f}", s_step=f"{dt:.2f}")
        if tr.step % cfg.log_every == 0 or tr.step == cfg.steps:
            rec = {"step": tr.step, "loss_ema": round(loss_ema, 5), "loss": round(info["loss"], 5),
                   "mse_block": [round(v, 4) for v in info["mse_block"]], "lr": round(info["lr"], 6),
                   "grad_norm": round(info["grad_norm"], 3), "rollout_blocks": info["rollout"],
                   "loss_rollout_ema": None if ro_ema is None else round(ro_ema, 5),
                   "s_per_step": round(dt, 3),
                   "wall_s": round(tr.wall, 1)}
            tr.history.append(rec)
            tqdm.write(json.dumps(rec))  # above the bar, one record per line in a log file
        stop = tr.time_budget_s is not None and tr.wall >= tr.time_budget_s
        if time.time() - last_ckpt > cfg.checkpoint_every_s or tr.step == cfg.steps or stop:
            tr.save(out)
            last_ckpt = time.time()
        if stop:
            print(f"time budget of {args.max_minutes} minutes spent at step {tr.step}", flush=True)
            break
