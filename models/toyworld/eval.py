"""Toy-world evaluation: metric functions, a drift-curve plot and a standalone block-by-block rollout.

    python -m inferix.models.toyworld.eval --frames 1000 --out DIR [--weights models/weights/toyworld.json]

The metrics compare generated frames with the simulator's frames for the same seed, prompt and actions:
- agent-position error: the agent is found in a generated frame by its colour (centroid of near-agent pixels);
- palette share: the share of pixels within ``tol`` (Euclidean RGB) of a simulator colour, per 100-frame window;
- PSNR per frame against two baselines that know only the context: the last context frame repeated, and the
  mean of the context frames; summarised per 32-frame window.

The rollout here needs no engine: a plain per-layer K/V list (``WindowKVBackend``) holds the committed frames,
trimmed to sink + window like the engine's cache. It follows the engine's semantics: each block is denoised
from noise with the bundle's few-step schedule (predict x0, re-noise to the next level), then committed by one
more pass on the clean x0 at ``context_timestep``; later blocks attend to the committed K/V.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..schedule import SamplingConfig
from ..text_encoder import HashTextEncoder
from ..wan_dit import CausalWanDiT, WanDiTConfig
from ...kernels.attention import SDPABackend
from . import simulator as sim
from .data import to_latent, to_pixels

__all__ = ["detect_color", "palette_share", "psnr", "rollout_metrics", "drift_curve_png", "strip_png",
           "WindowKVBackend", "RolloutMeta", "load_toyworld", "rollout", "main"]

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "toyworld.json"


# ---- metrics ---------------------------------------------------------------------------------------
def _as_frames(frames, what: str) -> np.ndarray:
    f = np.asarray(frames)
    if f.ndim != 4 or f.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 [T, H, W, 3], got shape {f.shape}")
    return f


def detect_color(frames, color, tol: float = 60.0, min_pixels: int = 6) -> np.ndarray:
    """Centroid (x, y) + 0.5 (pixel centres) of the pixels within tol of color, per frame: float [T, 2].

    NaN where fewer than min_pixels pixels match (object not drawn).
    """
    f = _as_frames(frames, "frames").astype(np.float32)
    hit = _sq_dist(f, np.asarray(color, np.float32)) <= tol * tol  # [T, H, W]
    out = np.full((f.shape[0], 2), np.nan)
    ys, xs = np.mgrid[0:f.shape[1], 0:f.shape[2]]
    n = hit.sum((1, 2))
    ok = n >= min_pixels
    out[ok, 0] = (hit * xs).sum((1, 2))[ok] / n[ok] + 0.5
    out[ok, 1] = (hit * ys).sum((1, 2))[ok] / n[ok] + 0.5
    return out


def palette_share(frames, colors=None, tol: float = 24.0) -> np.ndarray:
    """Share of pixels per frame whose nearest simulator colour is within tol (Euclidean RGB): float [T]."""
    f = _as_frames(frames, "frames").astype(np.float32)
    pal = np.asarray(sim.all_colors() if colors is None else colors, np.float32)
    T = f.shape[0]
    best = np.full(f.shape[:3], np.inf, np.float32)
    for c in pal:  # K small: a loop keeps memory at one [T, H, W] buffer
        np.minimum(best, _sq_dist(f, c), out=best)
    return (best <= tol * tol).reshape(T, -1).mean(1)


def _sq_dist(f: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared RGB distance of float [..., 3] pixels to one colour, channel by channel (a reduction over a
    last axis of 3 is slow in numpy)."""
    return (f[..., 0] - c[0]) ** 2 + (f[..., 1] - c[1]) ** 2 + (f[..., 2] - c[2]) ** 2


def psnr(a, b) -> np.ndarray:
    """PSNR in dB per frame between uint8 frame stacks [T, H, W, 3] (peak 255)."""
    a = _as_frames(a, "frames").astype(np.float64)
    b = _as_frames(b, "reference frames").astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"frame stacks differ in shape: {a.shape} vs {b.shape}")
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def _windows(x: np.ndarray, size: int) -> list[float]:
    return [float(np.mean(x[i:i + size])) for i in range(0, len(x), size)]


def rollout_metrics(gen_frames, true_frames, true_positions, context_frames, *, colors=None, palette_tol=24.0,
                    palette_window=100, psnr_window=32, psnr_frames=256) -> dict:
    """Per-frame metrics of a generated continuation and their window summaries.

    gen_frames / true_frames: uint8 [T, H, W, 3] of the generated frames and the simulator's frames for the same
    actions; true_positions: agent centres [T, 2] (x, y) from the simulator; context_frames: uint8 [C, H, W, 3],
    the true frames the model was started from (they feed the two baselines).
    """
    gen = _as_frames(gen_frames, "gen_frames")
    true = _as_frames(true_frames, "true_frames")
    ctx = np.asarray(context_frames)
    if len(ctx):
        ctx = _as_frames(ctx, "context_frames")
    pos = np.asarray(true_positions, np.float64)
    if gen.shape != true.shape:
        raise ValueError(f"gen_frames {gen.shape} and true_frames {true.shape} differ")
    if pos.shape != (len(true), 2):
        raise ValueError(f"true_positions must be [{len(true)}, 2], got {pos.shape}")
    T = len(gen)
    det = detect_color(gen, sim.AGENT_COLOR)
    err = np.linalg.norm(det - pos, axis=1)  # NaN where the agent was not found
    found = ~np.isnan(err)
    err_or_inf = np.where(found, err, np.inf)  # a missing agent counts as an unbounded error
    true_ball = detect_color(true, sim.BALL_COLOR, tol=10.0, min_pixels=1)
    gen_ball = detect_color(gen, sim.BALL_COLOR)
    ball_err = np.linalg.norm(gen_ball - true_ball, axis=1)
    share = palette_share(gen, colors, palette_tol)
    p_model = psnr(gen, true)
    if len(ctx):
        p_last = psnr(np.repeat(ctx[-1:], T, 0), true)
        mean_frame = np.round(ctx.astype(np.float64).mean(0)).astype(np.uint8)
        p_mean = psnr(np.repeat(mean_frame[None], T, 0), true)
    else:  # started from the prompt alone: no baseline knows anything, so both are left undefined
        p_last = p_mean = np.full(T, np.nan)
    n_ps = min(T, psnr_frames)
    w_model, w_last, w_mean = (_windows(p[:n_ps], psnr_window) for p in (p_model, p_last, p_mean))
    w_share = _windows(share, palette_window)
    median_err = float(np.median(err_or_inf))
    summary = {
        "frames": T,
        "agent_error_median_px": median_err,
        "agent_error_mean_px_found": float(np.nanmean(err)) if found.any() else None,
        "agent_found_share": float(found.mean()),
        "agent_error_median_px_per_100": _windows_median(err_or_inf, 100),
        "ball_found_share": float((~np.isnan(gen_ball[:, 0])).mean()),
        "ball_error_median_px": float(np.nanmedian(ball_err)) if (~np.isnan(ball_err)).any() else None,
        "palette_share_per_100": w_share,
        "palette_share_min_window": float(min(w_share)),
        "psnr_mean": float(p_model.mean()),
        "psnr_per_32": w_model, "psnr_copy_last_per_32": w_last, "psnr_context_mean_per_32": w_mean,
        "targets": {
            "agent_error_median_le_2px": bool(median_err <= 2.0),
            "palette_share_ge_95_every_100": bool(T >= 1000 and min(w_share) >= 0.95),
            "psnr_beats_baselines_every_32_of_first_256": bool(
                n_ps >= 256 and all(m > max(a, b) for m, a, b in zip(w_model, w_last, w_mean))),
        },
    }
    return {"summary": summary,
            "per_frame": {"agent_error_px": [None if np.isnan(e) else float(e) for e in err],
                          "palette_share": share.tolist(), "psnr": p_model.tolist(),
                          "psnr_copy_last": p_last.tolist(), "psnr_context_mean": p_mean.tolist()}}


def _windows_median(x: np.ndarray, size: int) -> list[float]:
    return [float(np.median(x[i:i + size])) for i in range(0, len(x), size)]


# ---- pictures (Pillow only) ------------------------------------------------------------------------
def drift_curve_png(metrics: dict, path, title: str = "toy world rollout") -> Path:
    """Three panels over the frame index: PSNR (model, copy-last, context-mean; 8-frame running mean),
    palette share, agent-position error. Drawn with Pillow."""
    from PIL import Image, ImageDraw

    pf = metrics["per_frame"]
    T = len(pf["psnr"])
    W, Hp, L, R, top = 900, 170, 60, 20, 30
    panels = [
        ("PSNR dB (8-frame mean)", [(pf["psnr"], (200, 30, 30), "model"), (pf["psnr_copy_last"], (40, 40, 200),
                                                                            "copy last"),
                                     (pf["psnr_context_mean"], (30, 150, 30), "context mean")], None),
        ("palette share", [(pf["palette_share"], (200, 30, 30), "model")], (0.0, 1.0)),
        ("agent error px (clipped at 32)", [([32.0 if e is None else min(e, 32.0) for e in pf["agent_error_px"]],
                                             (200, 30, 30), "model")], (0.0, 32.0)),
    ]
    img = Image.new("RGB", (W, top + len(panels) * (Hp + 30)), "white")
    dr = ImageDraw.Draw(img)
    dr.text((L, 8), title, fill="black")
    for i, (name, series, yr) in enumerate(panels):
        y0 = top + i * (Hp + 30) + 14
        dr.text((L, y0 - 14), name, fill="black")
        dr.rectangle([L, y0, W - R, y0 + Hp], outline=(120, 120, 120))
        smooth = []
        for vals, col, lab in series:
            v = np.asarray(vals, np.float64)
            if name.startswith("PSNR") and len(v) >= 8:
                v = np.convolve(v, np.ones(8) / 8, mode="same")
            smooth.append((v, col, lab))
        lo, hi = yr if yr else (min(s[0].min() for s in smooth) - 1, max(s[0].max() for s in smooth) + 1)
        dr.text((4, y0), f"{hi:.3g}", fill="black")
        dr.text((4, y0 + Hp - 12), f"{lo:.3g}", fill="black")
        for k, (v, col, lab) in enumerate(smooth):
            xs = L + np.arange(len(v)) * (W - L - R) / max(1, T - 1)
            ys = y0 + Hp - (np.clip(v, lo, hi) - lo) / max(hi - lo, 1e-9) * Hp
            dr.line(list(zip(xs.tolist(), ys.tolist())), fill=col, width=1)
            dr.text((W - R - 110, y0 + 4 + 15 * k), lab, fill=col)
        for fx in range(0, T, 100):
            x = L + fx * (W - L - R) / max(1, T - 1)
            dr.line([(x, y0 + Hp), (x, y0 + Hp + 4)], fill="black")
            dr.text((x - 8, y0 + Hp + 5), str(fx), fill="black")
    path = Path(path)
    img.save(path)
    return path


def strip_png(rows: list[tuple[str, np.ndarray]], columns: list[int], path, scale: int = 2) -> Path:
    """A grid of frames: one row per (label, uint8 [T, H, W, 3]), one column per frame index."""
    from PIL import Image, ImageDraw

    H, W = rows[0][1].shape[1:3]
    lab_w, gap, head = 70, 2, 14
    img = Image.new("RGB", (lab_w + len(columns) * (W * scale + gap), head + len(rows) * (H * scale + gap)),
                    "white")
    dr = ImageDraw.Draw(img)
    for j, c in enumerate(columns):
        dr.text((lab_w + j * (W * scale + gap) + 2, 1), f"t={c}", fill="black")
    for i, (label, frames) in enumerate(rows):
        y = head + i * (H * scale + gap)
        dr.text((2, y + H * scale // 2 - 6), label, fill="black")
        for j, c in enumerate(columns):
            fr = Image.fromarray(np.asarray(frames[c])).resize((W * scale, H * scale), Image.NEAREST)
            img.paste(fr, (lab_w + j * (W * scale + gap), y))
    path = Path(path)
    img.save(path)
    return path


# ---- standalone rollout ----------------------------------------------------------------------------
@dataclass
class RolloutMeta:
    commit: bool  # True: this pass's K/V are appended to the cache after attending


class WindowKVBackend(SDPABackend):
    """Dense per-layer K/V lists of the committed frames, trimmed to the first ``sink`` frames plus the most
    recent ``window - block_frames`` frames (the window counts the block being generated)."""
    name = "window-kv"

    def __init__(self, num_layers: int, frame_tokens: int, window: int, sink: int, block_frames: int):
        if window <= block_frames:
            raise ValueError(f"window {window} must exceed block_frames {block_frames}")
        self.k: list = [None] * num_layers
        self.v: list = [None] * num_layers
        self.T, self.sink = frame_tokens, sink
        self.keep = window - block_frames

    def frames_cached(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[1] // self.T

    def attend(self, q, k, v, layer, meta, k_raw=None):
        if not isinstance(meta, RolloutMeta):
            return super().attend(q, k, v, layer, meta, k_raw=k_raw)
        kc, vc = self.k[layer], self.v[layer]
        kk = k if kc is None else torch.cat([kc, k], 1)  # [B, (cached + own) tokens, H, D]
        vv = v if vc is None else torch.cat([vc, v], 1)
        out = self.masked(q, kk, vv, None)
        if meta.commit:
            s, n = self.sink * self.T, self.keep * self.T
            if kk.shape[1] > s + n:  # drop the oldest frames after the sink
                kk = torch.cat([kk[:, :s], kk[:, kk.shape[1] - n:]], 1)
                vv = torch.cat([vv[:, :s], vv[:, vv.shape[1] - n:]], 1)
            self.k[layer], self.v[layer] = kk, vv
        return out


def load_toyworld(path=DEFAULT_WEIGHTS, device="cpu"):
    """Read a toy-world bundle (json + safetensors) without the engine: (dit, text encoder, meta dict)."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"toy-world bundle not found: {path}")
    meta = json.loads(path.read_text())
    if meta.get("format") != "inferix-bundle":
        raise ValueError(f"{path} is not an inferix bundle (format={meta.get('format')!r})")
    wpath = path.with_suffix(".safetensors")
    if not wpath.exists():
        raise FileNotFoundError(f"bundle weights not found: {wpath}")
    sd = load_file(str(wpath))
    cfg = WanDiTConfig.from_dict(meta["dit"], what="dit config")
    dit = CausalWanDiT(cfg)
    _load_strict(dit, {k[4:]: v for k, v in sd.items() if k.startswith("dit.")}, wpath)
    te = meta["text_encoder"]
    if te.get("type") != "hash":
        raise ValueError(f"{path}: the toy world needs a 'hash' text encoder, got {te.get('type')!r}")
    text = HashTextEncoder(te["text_dim"], te["text_len"], te.get("vocab", 4096))
    _load_strict(text, {k[5:]: v for k, v in sd.items() if k.startswith("text.")}, wpath)
    return dit.to(device).eval(), text.to(device).eval(), meta


def _load_strict(module: torch.nn.Module, sd: dict, source) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise KeyError(f"{source}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    module.load_state_dict(sd)


@torch.no_grad()
def rollout(dit: CausalWanDiT, text, sampling: SamplingConfig, prompt: str, init_frames, actions, *, seed: int = 0,
            window: int = 12, sink: int = 0, init_actions=None):
    """Generate len(actions) frames after init_frames (uint8 [T0, H, W, 3], T0 a multiple of the block size).

    Yields uint8 [block_frames, H, W, 3] per block (the last block is cut to the number of actions).
    """
    bf = sampling.block_frames
    init = _as_frames(init_frames, "init_frames") if init_frames is not None else None
    T0 = 0 if init is None else len(init)
    if T0 % bf:
        raise ValueError(f"init_frames has {T0} frames, not a multiple of block_frames={bf}")
    acts = torch.as_tensor(sim.action_ids(actions, len(actions)))
    cfg = dit.config
    H = W = sim.SIZE
    be = WindowKVBackend(cfg.num_layers, dit.tokens_per_frame(H, W), window, sink, bf)
    dev = next(dit.parameters()).device
    ctx = dit.prepare_text(text.encode(prompt).to(dev))
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    ts, sig = sampling.timesteps, sampling.sigmas()
    commit = RolloutMeta(commit=True)
    probe = RolloutMeta(commit=False)
    ia = torch.zeros(T0, dtype=torch.long) if init_actions is None else torch.as_tensor(
        sim.action_ids(init_actions, T0))
    for b in range(0, T0, bf):  # commit the context frames block by block, clean, at the context timestep
        x = to_latent(init[b:b + bf])[None].to(dev)  # [1, bf, 3, H, W]
        pos = torch.arange(b, b + bf, device=dev)[None]
        dit(x, torch.full((1, bf), sampling.context_timestep, device=dev), ctx, frame_pos=pos, meta=commit,
            backend=be, actions=ia[b:b + bf][None].to(dev))
    n = len(acts)
    n_blocks = -(-n // bf)
    a_pad = torch.cat([acts, torch.zeros(n_blocks * bf - n, dtype=torch.long)])
    for i in range(n_blocks):
        f0 = T0 + i * bf
        pos = torch.arange(f0, f0 + bf, device=dev)[None]
        a = a_pad[i * bf:(i + 1) * bf][None].to(dev)
        x = torch.randn((1, bf, 3, H, W), generator=g).to(dev)
        x0 = None
        for k, t in enumerate(ts):
            out = dit(x, torch.full((1, bf), t, device=dev), ctx, frame_pos=pos, meta=probe, backend=be, actions=a)
            x0 = out if cfg.prediction == "x0" else x.float() - sig[k] * out
            if k + 1 < len(ts):
                s = sig[k + 1]
                x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g).to(dev)
        x0 = x0.clamp(-1, 1)
        dit(x0, torch.full((1, bf), sampling.context_timestep, device=dev), ctx, frame_pos=pos, meta=commit,
            backend=be, actions=a)
        frames = to_pixels(x0[0])  # [bf, H, W, 3]
        yield frames[: min(bf, n - i * bf)]


def run_eval(weights, frames: int, seed: int, prompt: str, context: int, steps: list | None, out: Path,
             threads: int, window: int | None = None, sink: int | None = None, strip: Path | None = None,
             init_actions: bool = True) -> dict:
    torch.set_num_threads(threads)
    dit, text, meta = load_toyworld(weights)
    sampling = SamplingConfig.from_dict(meta["sampling"])
    if steps:
        sampling = sampling.replace(denoising_steps=[float(s) for s in steps])
    window = meta.get("window", 12) if window is None else window
    sink = meta.get("sink", 0) if sink is None else sink
    rng = np.random.default_rng([seed, 99])
    acts = sim.random_actions(rng, context + frames)
    true, pos = sim.simulate(seed, acts, prompt, context + frames)
    # Speed: wall time from the call to the first yielded block (context commit included) and over all frames.
    t0 = time.perf_counter()
    gen, t_first = [], None
    for blk in rollout(dit, text, sampling, prompt, true[:context] if context else None, acts[context:], seed=seed,
                       window=window,
                       sink=sink, init_actions=acts[:context] if init_actions else None):
        if t_first is None:
            t_first = time.perf_counter() - t0
        gen.append(blk)
    total = time.perf_counter() - t0
    gen = np.concatenate(gen)
    m = rollout_metrics(gen, true[context:], pos[context:], true[:context])
    m["summary"].update({
        "prompt": prompt, "theme": sim.theme_of(prompt), "seed": seed, "context_frames": context, "init_actions": "true" if init_actions else "none",
        "sampling": sampling.to_dict(), "window": window, "sink": sink, "threads": threads,
        "time_to_first_block_s": t_first, "total_s": total, "pixel_fps": frames / total,
        "pixel_fps_after_first": (frames - sampling.block_frames) / max(total - t_first, 1e-9),
    })
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(m, indent=1))
    drift_curve_png(m, out / "drift.png", title=f"toy world, {frames} frames, prompt {prompt!r}, seed {seed}, "
                                                f"steps {sampling.denoising_steps}")
    cols = [c for c in (0, 4, 8, 16, 32, 64, 128, 256, 512, 999) if c < frames]
    strip_png([("truth", true[context:]), ("model", gen)], cols, strip or (out / "strip.png"))
    np.savez_compressed(out / "frames.npz", gen=gen, true=true[context:])
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inferix.models.toyworld.eval",
                                 description="Standalone toy-world rollout against the simulator (no engine).")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--prompt", default="a red cube in the snow")
    ap.add_argument("--context", type=int, default=8, help="true frames given as context (multiple of the block)")
    ap.add_argument("--steps", type=float, nargs="*", default=None, help="override the denoising steps")
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--sink", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init-actions", choices=["true", "none"], default="true",
                    help="actions given with the context frames: the simulator's, or 'none' for every frame (what "
                         "an engine that is handed bare frames does)")
    ap.add_argument("--strip", default=None, help="also write the truth-vs-model strip here")
    a = ap.parse_args(argv)
    m = run_eval(a.weights, a.frames, a.seed, a.prompt, a.context, a.steps, Path(a.out), a.threads, a.window,
                 a.sink, Path(a.strip) if a.strip else None, a.init_actions == "true")
    s = m["summary"]
    print(json.dumps({k: s[k] for k in ("agent_error_median_px", "agent_found_share", "palette_share_min_window",
                                        "psnr_per_32", "psnr_copy_last_per_32", "psnr_context_mean_per_32",
                                        "pixel_fps", "time_to_first_block_s", "targets")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
