"""Replay a reference rollout (weights, recorded noise, expected latents) through the engine and compare.

The folder layout is the one of tests/fixtures/self_forcing_tiny: config.json (model_kwargs, loop), weights.pt
or weights.safetensors, inputs.safetensors (prompt_embeds, initial_noise, renoise_b{b}_s{s}),
expected.safetensors (latents, optional x0_b{b}_s{s} and kv_layer0_k).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from inferix.models.bundle import ModelBundle
from inferix.models.config import read_json_object
from inferix.models.schedule import SamplingConfig
from inferix.models.wan_dit import WanDiTConfig

from .engine import Engine
from .plan import COMMIT, DENOISE
from .runner import RecordedNoise

__all__ = ["verify_fixture", "load_fixture_model", "run_replay"]

_MODEL_KEYS = {"patch_size", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim",
               "num_heads", "num_layers", "qk_norm", "cross_attn_norm", "eps"}


def _read_config(folder: Path) -> dict:
    return read_json_object(folder / "config.json", "fixture config")


def _load_tensors(path: Path, required: tuple[str, ...]) -> dict:
    """Tensors of a fixture's safetensors file; a missing, truncated or incomplete file is named in one line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a fixture folder holds config.json, weights, "
                                f"inputs.safetensors and expected.safetensors)")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # SafetensorError (truncated, bad header) is not an OSError or ValueError
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable safetensors file ({path.stat().st_size} bytes; {msg})") from e
    missing = [k for k in required if k not in tensors]
    if missing:
        raise ValueError(f"{path}: no tensor {', '.join(missing)} (has {len(tensors)} tensors)")
    return tensors


def load_fixture_model(folder: Path):
    cfg = _read_config(folder)
    mk = cfg["model_kwargs"]
    if mk.get("model_type", "t2v") != "t2v":
        raise ValueError(f"{folder}: only t2v models can be replayed, got model_type {mk['model_type']!r}")
    dit_cfg = WanDiTConfig.from_dict({k: v for k, v in mk.items() if k in _MODEL_KEYS}, what="model_kwargs")
    from inferix.models.checkpoints import load_dit
    weights = folder / "weights.pt"
    if not weights.exists():
        weights = folder / "weights.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{folder}: no weights.pt or weights.safetensors")
    dit = load_dit(weights, config=dit_cfg)
    return cfg, dit


def loop_sampling(loop: dict) -> SamplingConfig:
    """The sampler of a fixture's ``loop`` settings."""
    return SamplingConfig(denoising_steps=loop["denoising_step_list"], warp=bool(loop["warp_denoising_step"]),
                          shift=float(loop["timestep_shift"]),
                          num_train_timesteps=int(loop.get("num_train_timesteps", 1000)),
                          context_timestep=float(loop.get("context_noise", 0)),
                          block_frames=int(loop["num_frame_per_block"]),
                          independent_first_frame=bool(loop.get("independent_first_frame", False)))


def recorded_noise(inputs: dict) -> RecordedNoise:
    """The noise a fixture recorded: ``initial_noise`` [1, F, C, H, W] and every ``renoise_b{b}_s{s}``."""
    renoise = {}
    for k, v in inputs.items():
        if k.startswith("renoise_b"):
            b, s = k[len("renoise_b"):].split("_s")
            renoise[(int(b), int(s))] = v[0]
    return RecordedNoise(inputs["initial_noise"][0], renoise)


def run_replay(engine, folder: Path, expected: dict, **open_kw) -> tuple[dict, dict]:
    """One session of a fixture through the engine (``open_kw`` go to ``open_session``): the result's common part
    (latent and per-step x0 errors, pages left in use) and the session's block table after its last commit
    ({frame: page}, sink first, then the window, oldest first)."""
    x0_err, table = {}, {}

    def hook(plan, outs):
        for row in plan.rows():
            st = engine.runner.sessions[row.sid]
            if row.kind == DENOISE:
                name = f"x0_b{row.block}_s{row.step}"
                if name in expected:
                    x0_err[name] = float((st.x0[None].cpu() - expected[name]).abs().max())
            elif row.kind == COMMIT:
                table.clear()
                table.update(engine.kv.block_table(row.sid))

    engine.hooks.append(hook)
    sess = engine.open_session("", **open_kw)
    for _ in sess:
        pass
    latents = torch.cat(sess.latents, dim=0)[None].cpu()  # [1, F, C, H, W]
    if latents.shape != expected["latents"].shape:
        raise ValueError(f"{folder / 'expected.safetensors'}: latents has shape {list(expected['latents'].shape)}, "
                         f"the replay produced {list(latents.shape)}")
    result = {"fixture": str(folder), "attention_backend": engine.backend.name,
              "latents_max_abs_err": float((latents - expected["latents"]).abs().max()),
              "x0_max_abs_err": max(x0_err.values()) if x0_err else None, "x0_errors": x0_err,
              "pages_in_use_after": engine.pages_in_use}
    return result, table


def verify_fixture(folder, *, attention: str | None = None, tol: float | None = None, device="cpu",
                   parallel=None) -> dict:
    """parallel: an ``inferix.parallel.Parallel`` to replay under sequence parallelism (every rank calls this)."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json; is it a reference rollout folder?")
    from .fixture_actions import is_action_fixture, verify_action_fixture
    cfg0 = _read_config(folder)
    if is_action_fixture(cfg0):  # image + keyboard/mouse conditioned (Matrix-Game 2.0 schema)
        if parallel is not None:
            raise ValueError(f"{folder}: action-conditioned fixtures replay on one rank only")
        return verify_action_fixture(folder, cfg0, _load_tensors, attention=attention, tol=tol, device=device)
    cfg, dit = load_fixture_model(folder)
    loop = cfg["loop"]
    inputs = _load_tensors(folder / "inputs.safetensors", ("prompt_embeds", "initial_noise"))
    expected = _load_tensors(folder / "expected.safetensors", ("latents",))
    sampling = loop_sampling(loop)
    noise = recorded_noise(inputs)
    _, F, C, H, W = inputs["initial_noise"].shape
    window = loop.get("local_attn_size_frames", cfg["model_kwargs"].get("local_attn_size", -1))
    sink = loop.get("sink_size_frames", cfg["model_kwargs"].get("sink_size", 0))
    bundle = ModelBundle(name=folder.name, dit=dit.to(device).eval(), sampling=sampling, decoder=None,
                         text_encoder=None, height=H * 8, width=W * 8)
    engine = Engine(bundle, device=device, attention=attention, window=None if window in (-1, None) else int(window),
                    sink=int(sink or 0), positions="absolute", max_sessions=1, kv_pages=F, keep_latents=True,
                    parallel=parallel)
    result, table = run_replay(engine, folder, expected, num_frames=F, noise=noise,
                               text_embeds=inputs["prompt_embeds"])
    if "kv_layer0_k" in expected:
        # which frame each slot chunk of the reference cache holds: given by the fixture when its cache rolled,
        # otherwise the frames the session's block table holds at the end (sink first, then the window, oldest
        # first); pages of evicted frames may have been reused, so they are never compared
        slots = cfg.get("kv_layer0_k_layout", {}).get("slot_frames") or list(table)
        missing = [f for f in slots if f not in table]
        if missing:
            raise ValueError(f"the engine's block table holds no page for reference cache frames {missing} at the "
                             f"end (it holds frames {list(table)})")
        k = torch.cat([engine.pool.k[0][table[f]] for f in slots], dim=0)[None].float().cpu()
        exp_k = expected["kv_layer0_k"]
        ulysses = getattr(parallel, "ulysses", None)
        if ulysses is not None:  # this rank's pool holds its heads: compare those, then take the worst rank
            exp_k = ulysses.local_heads(exp_k, 2)
        err = float((k[:, :exp_k.shape[1]] - exp_k).abs().max())
        result["kv_layer0_k_max_abs_err"] = err if ulysses is None else parallel.max_over_ranks(err)
    if parallel is not None:
        result["parallel"] = parallel.describe()
    tol = float(cfg.get("checks", {}).get("recommended_atol", 1e-4)) if tol is None else tol
    result["tolerance"] = tol
    result["passed"] = result["latents_max_abs_err"] <= tol and result.get("kv_layer0_k_max_abs_err", 0.0) <= tol
    return result
