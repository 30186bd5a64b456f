"""Toy-world evaluation without the engine: a standalone block-by-block rollout, scored by ``metrics``.

    python -m inferix.models.toyworld.eval --frames 1000 --out DIR [--weights models/weights/toyworld.json]

The metrics and pictures live in ``metrics.py``. The rollout here needs no engine: a plain per-layer K/V list (``WindowKVBackend``) holds the committed frames,
trimmed to sink + window like the engine's cache. It follows the engine's semantics: each block is denoised
from noise with the bundle's few-step schedule (predict x0, re-noise to the next level), then committed by one
more pass on the clean x0 at ``context_timestep``; later blocks attend to the committed K/V.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..schedule import SamplingConfig
from ..tensor_files import load_prefixed_strict
from ..text_encoder import HashTextEncoder
from ..wan_dit import CausalWanDiT, WanDiTConfig
from ..corrector import CORRECTOR_MODES, use_corrector
from ..mirrors import check_mirrors, mirror_tensor, parse_mirrors
from ..window_kv import RolloutMeta, WindowKVBackend
from . import simulator as sim
from .data import to_latent, to_pixels
from .metrics import _as_frames, drift_curve_png, eval_episode, rollout_metrics, strip_png

__all__ = ["WindowKVBackend", "RolloutMeta", "load_toyworld", "load_decoder", "load_corrector", "load_parts", "rollout",
           "main"]

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "toyworld.json"


# ---- loading and the standalone rollout --------------------------------------------------------------
def _read_bundle(path) -> tuple[dict, dict, Path]:
    """A toy-world bundle's meta (json), tensors (its safetensors, read once) and weights path, checked."""
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
    return meta, load_file(str(wpath)), wpath


def _dit_and_text(path: Path, meta: dict, sd: dict, wpath: Path, device):
    cfg = WanDiTConfig.from_dict(meta["dit"], what="dit config")
    dit = CausalWanDiT(cfg)
    load_prefixed_strict(dit, sd, "dit.", wpath)
    te = meta["text_encoder"]
    if te.get("type") != "hash":
        raise ValueError(f"{path}: the toy world needs a 'hash' text encoder, got {te.get('type')!r}")
    text = HashTextEncoder(te["text_dim"], te["text_len"], te.get("vocab", 4096))
    load_prefixed_strict(text, sd, "text.", wpath)
    return dit.to(device).eval(), text.to(device).eval()


def load_toyworld(path=DEFAULT_WEIGHTS, device="cpu"):
    """Read a toy-world bundle (json + safetensors) without the engine: (dit, text encoder, meta dict)."""
    meta, sd, wpath = _read_bundle(path)
    return (*_dit_and_text(Path(path), meta, sd, wpath, device), meta)


def load_corrector(path, meta: dict, tensors: dict | None = None):
    """The bundle's ``ActionCorrector``, or None if it has none. ``tensors``: the bundle's tensors, if already read."""
    from safetensors.torch import load_file
    from ..corrector import corrector_from
    if meta.get("corrector") is None:
        return None
    wpath = Path(path).with_suffix(".safetensors")
    return corrector_from(meta, load_file(str(wpath)) if tensors is None else tensors, wpath,
                          meta["dit"]["num_actions"])


def load_decoder(path, meta: dict, tensors: dict | None = None):
    """The bundle's ``PixelDecoder`` (with its refiner, if it has one). ``tensors``: the bundle's tensors, if
    already read."""
    from safetensors.torch import load_file
    from ..bundle import pixel_decoder_from
    wpath = Path(path).with_suffix(".safetensors")
    if tensors is None:
        tensors = load_file(str(wpath)) if (meta.get("decoder") or {}).get("refiner") else {}
    return pixel_decoder_from(meta, tensors, wpath, meta["dit"]["in_dim"])


def load_parts(path=DEFAULT_WEIGHTS, device="cpu"):
    """Everything the engine-free rollout runs, from one read of the bundle: (dit, text encoder, meta, decoder,
    corrector or None)."""
    meta, sd, wpath = _read_bundle(path)
    dit, text = _dit_and_text(Path(path), meta, sd, wpath, device)
    return dit, text, meta, load_decoder(path, meta, sd), load_corrector(path, meta, sd)


@torch.no_grad()
def rollout(dit: CausalWanDiT, text, sampling: SamplingConfig, prompt: str, init_frames, actions, *, seed: int = 0,
            window: int = 12, sink: int = 0, init_actions=None, decoder=None, positions: str = "absolute",
            mirrors: tuple = (), combine=None, corrector=None):
    """Generate len(actions) frames after init_frames (uint8 [T0, H, W, 3], T0 a multiple of the block size).

    ``window``/``sink``: frames a block attends to (counting the sink and the block) and first frames kept for
    good, as in the engine. ``positions``: "absolute" (frame index in the video) or "relative" (cache order, as
    the engine runs a bundle that says so). The noise is drawn like the engine's for the same seed, so with the
    same settings both give the same frames.
    ``decoder``: a ``PixelDecoder`` (its refiner renders each block; the cache keeps the DiT's estimate). Its stream
    state is primed with the start frames, as the engine primes it.

    ``mirrors``: mirror images of the world (names from ``simulator.MIRRORS``) run beside it as extra batch rows,
    each with its own cache holding the mirrored frames and played with the mirrored actions and the mirrored
    noise; every block's estimate is the mean of all views' estimates mapped back, and that mean is what every
    view commits (mirrored) and what the decoder renders. The DiT is not exactly mirror-equivariant, so its views
    err differently and the mean errs less.

    ``combine``: instead of that mean, ``combine(estimates, actions, last)`` makes each step's estimate from the
    views' estimates mapped back (x0, [V, F, C, H, W], the world's own first), the block's actions (ids [F]) and the
    frame committed last ([C, H, W], or None); it returns [F, C, H, W]. The corrector's training pairs are
    recorded through it (models/toyworld/corrector_train.py).

    ``corrector``: an ``ActionCorrector`` run on each block's final estimate before the commit, as the engine runs
    the bundle's (frame 0 after the last committed frame, or after its own estimate when nothing came before).

    Yields uint8 [block_frames, H, W, 3] per block (the last block is cut to the number of actions).
    """
    mirrors = check_mirrors(mirrors)
    views = [None] + list(mirrors)  # None: the world itself
    V = len(views)
    perms = torch.tensor([range(len(sim.ACTIONS)) if m is None else sim.MIRRORS[m][2] for m in views],
                         dtype=torch.long)  # [V, actions]

    def look(x, m):
        return x if m is None else mirror_tensor(x, m)

    def fan(x):  # [1, F, C, H, W] -> [V, F, C, H, W]: each view's mirror image
        return torch.cat([look(x, m) for m in views])

    def gather(x, a):  # [V, F, C, H, W] -> [1, F, C, H, W]: the views mapped back, averaged (or combined)
        est = torch.stack([look(x[i], m) for i, m in enumerate(views)])
        return (est.mean(0) if combine is None else combine(est, a[0], last))[None]

    def fan_actions(a):  # [1, F] -> [V, F]
        return perms[:, a[0].cpu()].to(a.device)
    bf = sampling.block_frames
    init = _as_frames(init_frames, "init_frames") if init_frames is not None else None
    T0 = 0 if init is None else len(init)
    if T0 % bf:
        raise ValueError(f"init_frames has {T0} frames, not a multiple of block_frames={bf}")
    acts = torch.as_tensor(sim.action_ids(actions, len(actions)))
    cfg = dit.config
    H = W = sim.SIZE
    dev = next(dit.parameters()).device
    if positions not in ("absolute", "relative"):
        raise ValueError(f"positions must be 'absolute' or 'relative', got {positions!r}")
    _, ph, pw = cfg.patch_size

    def cache_rope(n):  # cos/sin for cache positions 0..n-1
        return dit.rope_for(torch.arange(n, device=dev)[None], H // ph, W // pw)
    be = WindowKVBackend(cfg.num_layers, dit.tokens_per_frame(H, W), window, sink, bf,
                         rope=cache_rope if positions == "relative" else None)

    def frame_pos(f0):  # positions of the block that starts at video frame f0
        start = be.frames_cached() if positions == "relative" else f0
        return torch.arange(start, start + bf, device=dev)[None]
    ctx = dit.prepare_text(text.encode(prompt).to(dev))
    if V > 1:
        ctx = type(ctx).cat([ctx] * V)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    ts, sig = sampling.timesteps, sampling.sigmas()
    commit = RolloutMeta(commit=True)
    probe = RolloutMeta(commit=False)
    ia = torch.zeros(T0, dtype=torch.long) if init_actions is None else torch.as_tensor(
        sim.action_ids(init_actions, T0))
    last = to_latent(init[-1]).to(dev) if T0 else None  # the frame committed last (the corrector's "before")
    dec_state = None if decoder is None else decoder.new_stream()
    if dec_state is not None and T0:  # the start frames fill the refiner's reference, as the engine's priming does
        dec_state.reference(to_latent(init).to(dev))
    for b in range(0, T0, bf):  # commit the context frames block by block, clean, at the context timestep
        x = to_latent(init[b:b + bf])[None].to(dev)  # [1, bf, 3, H, W]
        pos = frame_pos(b)
        dit(fan(x), torch.full((V, bf), sampling.context_timestep, device=dev), ctx, frame_pos=pos.expand(V, -1),
            meta=commit, backend=be, actions=fan_actions(ia[b:b + bf][None].to(dev)), kv_only=True)
    n = len(acts)
    n_blocks = -(-n // bf)
    a_pad = torch.cat([acts, torch.zeros(n_blocks * bf - n, dtype=torch.long)])
    for i in range(n_blocks):
        pos = frame_pos(T0 + i * bf)
        a = a_pad[i * bf:(i + 1) * bf][None].to(dev)
        x = torch.randn((1, bf, 3, H, W), generator=g).to(dev)
        x0 = None
        for k, t in enumerate(ts):
            out = dit(fan(x), torch.full((V, bf), t, device=dev), ctx, frame_pos=pos.expand(V, -1), meta=probe,
                      backend=be, actions=fan_actions(a))
            x0 = gather(out if cfg.prediction == "x0" else fan(x).float() - sig[k] * out, a)
            if k + 1 < len(ts):
                s = sig[k + 1]
                x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g).to(dev)
        if corrector is not None:
            x0 = corrector.block(x0[0], last, a[0])[None]
        x0 = x0.clamp(-1, 1)
        last = x0[0, -1]
        dit(fan(x0), torch.full((V, bf), sampling.context_timestep, device=dev), ctx, frame_pos=pos.expand(V, -1),
            meta=commit, backend=be, actions=fan_actions(a), kv_only=True)
        frames = to_pixels(x0[0] if decoder is None else decoder.refine_stream(dec_state, x0[0]))  # [bf, H, W, 3]
        yield frames[: min(bf, n - i * bf)]


def run_eval(weights, frames: int, seed: int, prompt: str, context: int, steps: list | None, out: Path,
             threads: int, window: int | None = None, sink: int | None = None, strip: Path | None = None,
             init_actions: bool = True, positions: str | None = None, mirrors: tuple = (),
             corrector: bool | None = None) -> dict:
    """``corrector``: run the bundle's corrector (None: if it has one and no mirror views run, as the engine)."""
    torch.set_num_threads(threads)
    dit, text, meta, decoder, corr = load_parts(weights)
    if not use_corrector(corrector, corr is not None, mirrors, str(weights)):
        corr = None
    sampling = SamplingConfig.from_dict(meta["sampling"])
    if steps:
        sampling = sampling.replace(denoising_steps=[float(s) for s in steps])
    window = meta.get("window", 12) if window is None else window
    sink = meta.get("sink", 0) if sink is None else sink
    if positions is None:  # the engine's "auto": the bundle's choice, else relative (a window is always set here)
        positions = meta.get("positions") or "relative"
    acts, true, pos = eval_episode(seed, prompt, context + frames)
    # Speed: wall time from the call to the first yielded block (context commit included) and over all frames.
    t0 = time.perf_counter()
    gen, t_first = [], None
    for blk in rollout(dit, text, sampling, prompt, true[:context] if context else None, acts[context:], seed=seed,
                       window=window, sink=sink, init_actions=acts[:context] if init_actions else None,
                       decoder=decoder, positions=positions, mirrors=mirrors, corrector=corr):
        if t_first is None:
            t_first = time.perf_counter() - t0
        gen.append(blk)
    total = time.perf_counter() - t0
    gen = np.concatenate(gen)
    m = rollout_metrics(gen, true[context:], pos[context:], true[:context])
    m["summary"].update({
        "prompt": prompt, "theme": sim.theme_of(prompt), "seed": seed, "context_frames": context, "init_actions": "true" if init_actions else "none",
        "sampling": sampling.to_dict(), "window": window, "sink": sink, "positions": positions, "threads": threads,
        "mirrors": list(mirrors), "corrector": corr is not None,
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
    ap.add_argument("--positions", choices=["absolute", "relative"], default=None,
                    help="frame positions (default: the bundle's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init-actions", choices=["true", "none"], default="true",
                    help="actions given with the context frames: the simulator's, or 'none' for every frame (what "
                         "an engine that is handed bare frames does)")
    ap.add_argument("--strip", default=None, help="also write the truth-vs-model strip here")
    ap.add_argument("--mirrors", default="", help="comma-separated mirror views run beside the world and averaged "
                                                   "each block (h, v, hv, d, a); default none")
    ap.add_argument("--corrector", choices=["auto", "on", "off"], default="auto",
                    help="the bundle's action corrector: auto runs it if the bundle has one and no mirror views run")
    a = ap.parse_args(argv)
    try:
        mirrors = parse_mirrors(a.mirrors)
    except ValueError as e:
        ap.error(f"--mirrors: {e}")
    m = run_eval(a.weights, a.frames, a.seed, a.prompt, a.context, a.steps, Path(a.out), a.threads, a.window,
                 a.sink, Path(a.strip) if a.strip else None, a.init_actions == "true", a.positions, mirrors,
                 CORRECTOR_MODES[a.corrector])
    s = m["summary"]
    print(json.dumps({k: s[k] for k in ("agent_error_median_px", "agent_found_share", "palette_share_min_window",
                                        "psnr_per_32", "psnr_copy_last_per_32", "psnr_context_mean_per_32",
                                        "pixel_fps", "time_to_first_block_s", "targets", "mirrors", "corrector")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
