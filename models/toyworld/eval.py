"""An engine-free toy-world rollout, kept as a test oracle: the tests check the engine against it (same frames for
the same seed, mirror views, corrector, refiner). No command and no production path uses it; the toy world's
evaluation and training data come from the engine (app/toyworld/).

The rollout needs no engine: a plain per-layer K/V list (``WindowKVBackend``) holds the committed frames, trimmed
to sink + window by its own code, written apart from the engine's. It follows the engine's semantics: each block
is denoised from noise with the bundle's few-step schedule (predict x0, re-noise to the next level), then committed
by one more pass on the clean x0 at ``context_timestep``; later blocks attend to the committed K/V.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..schedule import SamplingConfig
from ..tensor_files import load_prefixed_strict
from ..text_encoder import HashTextEncoder
from ..wan_dit import CausalWanDiT, WanDiTConfig
from ..mirrors import check_mirrors, mirror_tensor
from ..window_kv import RolloutMeta, WindowKVBackend
from . import simulator as sim
from .data import to_latent, to_pixels
from .metrics import _as_frames

__all__ = ["WindowKVBackend", "RolloutMeta", "load_toyworld", "load_decoder", "load_corrector", "load_parts",
           "rollout"]

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
