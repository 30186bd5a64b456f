"""Replay an action-conditioned image-to-video reference rollout (Matrix-Game 2.0 schema) through the engine.

The folder layout is the one of tests/fixtures/matrix_game_tiny: config.json (``model_kwargs`` of the release's
``CausalWanModel`` with its ``action_config``, ``loop``), weights.safetensors (``model.``-prefixed keys),
inputs.safetensors (``visual_context``, ``cond_concat``, ``initial_noise``, ``keyboard_cond``, optional
``mouse_cond``, ``renoise_b{b}_s{s}``) and expected.safetensors (``latents``, optional ``x0_b{b}_s{s}``, layer-0
caches ``kv_layer0_k``, ``kv_keyboard_layer0_{k,v}``, ``kv_mouse_layer0_{k,v}``, and the action-module probe
``debug_call0_layer0_action_{in,out}``). Latent videos are stored (B, F, C, H, W). Any variant, window and latent
shape of that schema replays: the model, loop and shapes all come from the folder.
"""
from __future__ import annotations

from pathlib import Path

import torch

from inferix.models.matrixgame.adapter import actions_from_sequences
from inferix.models.matrixgame.bundle import build_bundle, load_weights
from inferix.models.matrixgame.dit import FrameConditions, MatrixGameConfig, MatrixGameDiT, action_windows

from .engine import Engine
from .fixture import loop_sampling, recorded_noise, run_replay

__all__ = ["verify_action_fixture", "is_action_fixture"]


def is_action_fixture(cfg: dict) -> bool:
    mk = cfg.get("model_kwargs", {})
    return mk.get("model_type") == "i2v" and bool(mk.get("action_config"))


def verify_action_fixture(folder: Path, cfg: dict, load_tensors, *, attention: str | None = None,
                          tol: float | None = None, device="cpu") -> dict:
    """load_tensors(path, required) reads a fixture file with one-line errors (inferix/fixture.py)."""
    folder = Path(folder)
    loop = cfg["loop"]
    inputs = load_tensors(folder / "inputs.safetensors", ("visual_context", "cond_concat", "initial_noise",
                                                          "keyboard_cond"))
    expected = load_tensors(folder / "expected.safetensors", ("latents",))
    weights = load_tensors(folder / "weights.safetensors", ())
    vc = inputs["visual_context"]
    mcfg = MatrixGameConfig.from_release({**cfg["model_kwargs"], "image_dim": int(vc.shape[-1])})
    dit = MatrixGameDiT(mcfg)
    load_weights(dit, weights, folder / "weights.safetensors")
    dit = dit.to(device).eval()
    bf = int(loop["num_frame_per_block"])
    _, F, C, H, W = inputs["initial_noise"].shape
    window = loop.get("local_attn_size_frames", mcfg.local_attn_size)
    sink = loop.get("sink_size_frames", mcfg.sink_size)
    bundle = build_bundle(dit, name=folder.name, height=H * 8, width=W * 8)
    bundle.sampling = loop_sampling(loop)
    engine = Engine(bundle, device=device, attention=attention,
                    window=None if window in (-1, None) else int(window), sink=int(sink or 0),
                    positions="absolute", max_sessions=1, kv_pages=F, keep_latents=True)
    cond = inputs["cond_concat"][0]  # [F, 20, H, W]: mask, image latent
    nmask = mcfg.cond_channels - mcfg.out_dim
    want_mask = torch.zeros(F, nmask, H, W)
    want_mask[0] = 1
    if not torch.equal(cond[:, :nmask], want_mask):
        raise ValueError(f"{folder}: cond_concat's mask channels are not 1 on latent frame 0 and 0 elsewhere")
    kb = inputs["keyboard_cond"][0]
    ms = inputs["mouse_cond"][0] if "mouse_cond" in inputs else None
    result, table = run_replay(engine, folder, expected, num_frames=kb.shape[0],
                               noise=recorded_noise(inputs), actions=actions_from_sequences(kb, ms),
                               model_inputs={"image_tokens": vc, "image_latents": cond[:, nmask:]})
    errs = [result["latents_max_abs_err"]]
    frames = sorted(table)
    pool = engine.pool

    def compare(name, got):
        if name in expected:
            e = float((got.float().cpu() - expected[name]).abs().max()) if got.shape == expected[name].shape \
                else float("inf")
            result[f"{name}_max_abs_err"] = e
            errs.append(e)

    if frames:
        pages = torch.tensor([table[f] for f in frames])
        compare("kv_layer0_k", pool.k[0][pages].reshape(1, -1, *pool.k[0].shape[2:]))
        for kind in ("k", "v"):
            g = pool.groups.get(f"action.0.keyboard_{kind}")
            if g is not None:
                compare(f"kv_keyboard_layer0_{kind}", g[pages][:, 0][None])
            g = pool.groups.get(f"action.0.mouse_{kind}")
            if g is not None:
                compare(f"kv_mouse_layer0_{kind}", g[pages].transpose(0, 1))
    if "debug_call0_layer0_action_in" in expected and 0 in mcfg.action_config.blocks:
        fr = list(range(bf))
        ratio, win = mcfg.action_config.vae_time_compression_ratio, mcfg.action_config.window
        def windows(seq):
            return None if seq is None else action_windows(seq, fr, ratio, win)[None].to(device)
        fc = FrameConditions(concat=inputs["cond_concat"][:, :bf].to(device), keyboard=windows(kb), mouse=windows(ms))
        with torch.no_grad():
            out = dit.blocks[0].action_model(expected["debug_call0_layer0_action_in"].to(device), fc,
                                             torch.tensor([fr], device=device), None, bf, exact=True)
        compare("debug_call0_layer0_action_out", out)
    tol = float(cfg.get("checks", {}).get("recommended_atol", 1e-4)) if tol is None else tol
    result["tolerance"] = tol
    result["passed"] = all(e <= tol for e in errs)
    return result
