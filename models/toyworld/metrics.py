"""Toy-world metrics and pictures: generated frames against the simulator's for the same seed, prompt, actions.

- agent-position error: the agent is found in a generated frame by its colour (centroid of near-agent pixels);
- palette share: the share of pixels within ``tol`` (Euclidean RGB) of a simulator colour, per 100-frame window;
- PSNR per frame against two baselines that know only the context: the last context frame repeated, and the
  mean of the context frames; summarised per 32-frame window.

``drift_curve_png`` and ``strip_png`` draw them with Pillow.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import simulator as sim

__all__ = ["eval_episode", "detect_color", "palette_share", "psnr", "rollout_metrics", "drift_curve_png",
           "strip_png"]


def eval_episode(seed: int, prompt: str, num_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The episode every evaluation compares against: the simulator for (seed, prompt) played by a random player
    drawn from (seed, 99). Returns actions int64 [T], frames uint8 [T, H, W, 3], agent centres float [T, 2]."""
    acts = sim.random_actions(np.random.default_rng([seed, 99]), num_frames)
    frames, pos = sim.simulate(seed, acts, prompt, num_frames)
    return acts, frames, pos


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
                          "ball_error_px": [None if np.isnan(e) else float(e) for e in ball_err],
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
