"""Ground-truth drift for worlds with a simulator (the toy world): PSNR and agent-position error per chunk.

A *ground-truth hook* is any callable ``hook(frames, item) -> dict | None``: ``frames`` is the generated
video (uint8 [T, H, W, 3]) and ``item`` describes it (for ``lvbench run``: the prompt record with its id,
captions and seed; for ``lvbench eval``: ``{"path": ...}``). It returns ``ground_truth_drift(...)``'s dict
(or None when it has no ground truth for that video). A simulator provides the hook by replaying the same
seed and actions and calling ``ground_truth_drift`` with its frames and agent positions. On the command
line a hook is named as ``package.module:function``.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import numpy as np

from inferix.drift import DEFAULT_NUM_CHUNKS, check_frames, chunk_bounds, vde

GroundTruthHook = Callable[[np.ndarray, dict], Optional[dict]]

PSNR_CAP_DB = 100.0  # identical frames would give +inf; a cap keeps per-chunk means finite


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame PSNR in dB of two uint8 [T, H, W, 3] stacks (peak 255), capped at PSNR_CAP_DB."""
    d = a.astype(np.float64) - b.astype(np.float64)
    mse = (d * d).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        val = 10.0 * np.log10(255.0**2 / mse)
    return np.minimum(val, PSNR_CAP_DB)


def ground_truth_drift(frames: np.ndarray, gt_frames: np.ndarray, gt_positions: np.ndarray | None = None,
                       pred_positions: np.ndarray | None = None,
                       locate: Callable[[np.ndarray], np.ndarray] | None = None,
                       num_chunks: int = DEFAULT_NUM_CHUNKS, weighting: str = "linear") -> dict:
    """Per-chunk PSNR against the simulator's frames and, when positions are given, per-chunk agent
    position error.

    frames, gt_frames: uint8 [T, H, W, 3] of the same shape.
    gt_positions: [T, 2] (or [T, K, 2] for K agents) simulator positions, in any unit (pixels, cells).
    pred_positions: the same layout, read off the generated frames; or pass ``locate(frames) -> positions``
    (e.g. a colour-blob finder for the toy world's agent). Error = Euclidean distance, mean over agents.
    Chunks as in VDE (remainder frames dropped). Returns chunk_psnr, psnr_vde, mean_psnr and, with positions,
    chunk_position_error and final_position_error (last chunk's mean).
    """
    check_frames(frames, "frames")
    check_frames(gt_frames, "gt_frames")
    if frames.shape != gt_frames.shape:
        raise ValueError(f"frames {tuple(frames.shape)} and gt_frames {tuple(gt_frames.shape)} differ in shape")
    bounds = chunk_bounds(len(frames), num_chunks)
    if not bounds:
        raise ValueError(f"{len(frames)} frames are fewer than num_chunks={num_chunks}")
    p = psnr(frames, gt_frames)
    chunk_psnr = [float(p[a:b].mean()) for a, b in bounds]
    out = {"num_chunks": num_chunks, "chunk_psnr": chunk_psnr, "mean_psnr": float(p[: bounds[-1][1]].mean()),
           "psnr_vde": vde(chunk_psnr, weighting), "chunk_position_error": None, "final_position_error": None}
    if gt_positions is None:
        if pred_positions is not None or locate is not None:
            raise ValueError("predicted positions were given without gt_positions")
        return out
    gt = np.asarray(gt_positions, dtype=np.float64)
    if pred_positions is None:
        if locate is None:
            raise ValueError("gt_positions need pred_positions or a locate(frames) function")
        pred_positions = locate(frames)
    pred = np.asarray(pred_positions, dtype=np.float64)
    if gt.shape != pred.shape:
        raise ValueError(f"gt_positions {gt.shape} and predicted positions {pred.shape} differ in shape")
    if gt.ndim not in (2, 3) or gt.shape[0] != len(frames) or gt.shape[-1] != 2:
        raise ValueError(f"positions must be [T, 2] or [T, K, 2] with T={len(frames)}, got {gt.shape}")
    err = np.linalg.norm(pred - gt, axis=-1)
    if err.ndim == 2:  # [T, K] -> [T]
        err = err.mean(1)
    chunk_err = [float(err[a:b].mean()) for a, b in bounds]
    out["chunk_position_error"] = chunk_err
    out["final_position_error"] = chunk_err[-1]
    return out


def load_hook(spec: str) -> GroundTruthHook:
    """Import ``package.module:function``."""
    if ":" not in spec:
        raise ValueError(f"ground-truth hook must look like 'package.module:function', got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"ground-truth hook {spec!r}: cannot import {mod_name!r} ({e})") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"ground-truth hook {spec!r}: {mod_name!r} has no callable {fn_name!r}")
    return fn
