"""Checkpoint files of the causal Wan DiT: detection, reading (containers, shards), building, saving. The key
renaming and config translation they need are in ``wan_keys.py``.

Formats ``load_dit`` reads (detected from what is on disk, never from the file name alone):

a) a diffusers ``WanTransformer3DModel`` directory: ``config.json`` with ``_class_name`` WanTransformer3DModel and
   ``diffusion_pytorch_model.safetensors`` or a sharded ``diffusion_pytorch_model.safetensors.index.json``;
   keys are renamed to ours (``diffusers_to_wan_key``) and the config is translated.
b) an original Wan directory: ``config.json`` with Wan keys (``dim``, ``num_layers`` ...) and safetensors weights
   (possibly sharded); keys are already ours. ``save_dit`` writes this layout.
c) a single file: Self-Forcing / CausVid / LongLive ``.pt``/``.pth`` containers (``generator_ema`` / ``generator`` /
   ``model`` holding a state dict whose keys carry the wrapper's ``model.`` prefix), a flat state dict, or a
   ``.safetensors`` file with our names or diffusers names. Pickles are read with ``weights_only=True`` only.

A diffusers *pipeline* directory (``model_index.json`` with transformer/, vae/, text_encoder/, tokenizer/) is read
by ``load_pipeline_dir``.

Large models are built on the meta device and filled with ``load_state_dict(assign=True)``, so no random weights
are ever allocated. Every problem with a state dict (missing keys, unexpected keys, shape mismatches) is reported
by name in one ``CheckpointError``.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .tensor_files import CheckpointError, _only_tensors, _require_exists, read_tensor_file
from .wan_dit import CausalWanDiT, WanDiTConfig
from .wan_keys import (WAN_TEXT_LEN, _config_kind, _fields_from_config_json, _make_config, diffusers_to_wan_key,
                       infer_dit_config, normalise_keys, wan_config_from_diffusers, wan_config_from_wan)

__all__ = [
    "CheckpointError", "load_dit", "save_dit", "load_pipeline_dir", "read_tensor_file", "read_state_dict",
    "diffusers_to_wan_key", "wan_config_from_diffusers", "wan_config_from_wan", "infer_dit_config",
]

# Containers used by Self-Forcing / CausVid / LongLive training checkpoints, in the order they are tried.
_CONTAINER_KEYS_EMA = ("generator_ema", "generator", "model", "state_dict")
_CONTAINER_KEYS = ("generator", "generator_ema", "model", "state_dict")


# ---------------------------------------------------------------------------------------------------
# training containers, sharded directories (one file is read by tensor_files.read_tensor_file)
# ---------------------------------------------------------------------------------------------------
def _unwrap_container(obj: dict, source: str, use_ema: bool | None) -> dict:
    """Pick the generator state dict out of a training checkpoint (or return a flat state dict as is)."""
    if use_ema is False and "generator" not in obj and "generator_ema" in obj:
        raise CheckpointError(f"{source}: use_ema=False asked for 'generator' but the file only has 'generator_ema'")
    order = _CONTAINER_KEYS if use_ema is False else _CONTAINER_KEYS_EMA
    for key in order:
        if key in obj and isinstance(obj[key], dict):
            return _only_tensors(obj[key], f"{source}['{key}']")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    kinds = {k: type(v).__name__ for k, v in list(obj.items())[:12]}
    raise CheckpointError(f"{source}: neither a flat state dict nor a container with one of "
                          f"{list(_CONTAINER_KEYS_EMA)}; top-level entries: {kinds}")


def _read_sharded(dir_: Path, index_name: str) -> dict:
    index_path = dir_ / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: not a shard index with a 'weight_map' ({e})") from None
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (dir_ / s).exists()]
    if missing:
        raise CheckpointError(f"{index_path}: shard files not found in {dir_}: {missing}")
    sd = {}
    for shard in tqdm(shards, desc=f"loading {dir_.name}", disable=len(shards) < 2, leave=False):
        part, _ = read_tensor_file(dir_ / shard)
        sd.update(part)
    return sd


def _read_weights_in_dir(dir_: Path) -> dict:
    """The DiT weights of a diffusers or Wan directory (single file or sharded)."""
    for index in ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"):
        if (dir_ / index).exists():
            return _read_sharded(dir_, index)
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (dir_ / name).exists():
            return read_tensor_file(dir_ / name)[0]
    files = sorted(p.name for p in dir_.glob("*.safetensors"))
    if len(files) == 1:
        return read_tensor_file(dir_ / files[0])[0]
    raise CheckpointError(f"{dir_}: no DiT weights found (expected diffusion_pytorch_model.safetensors or a "
                          "*.safetensors.index.json shard index); directory holds "
                          f"{sorted(p.name for p in dir_.iterdir())}")


# ---------------------------------------------------------------------------------------------------
# building the model
# ---------------------------------------------------------------------------------------------------
def _check_state_dict(model: torch.nn.Module, sd: dict, source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
                        for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
        raise CheckpointError(f"{source}: state dict does not fit the DiT config - " + " | ".join(parts))


def build_dit(sd: dict, cfg: WanDiTConfig, *, device="cpu", dtype=torch.float32,
              source: str = "checkpoint") -> CausalWanDiT:
    """Build on the meta device and assign the checkpoint tensors (no random init, one copy in memory)."""
    with torch.device("meta"):
        model = CausalWanDiT(cfg)
    _check_state_dict(model, sd, source)
    total = sum(v.numel() * v.element_size() for v in sd.values())
    ready = {}
    for k, v in tqdm(sd.items(), desc="placing weights", disable=total < (1 << 28), leave=False):
        ready[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
    model.load_state_dict(ready, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left and torch.device(device).type != "meta":
        raise CheckpointError(f"{source}: tensors left without values after loading: {left[:20]}")
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------------
def _sidecar_fields(file: Path) -> dict | None:
    """Config fields from ``<stem>.json`` or ``config.json`` beside a weights file, if one describes a DiT
    (a config.json of something else in the same folder is not an error: it is simply not used)."""
    for cand in (file.with_suffix(".json"), file.parent / "config.json"):
        if not cand.exists() or cand == file:
            continue
        try:
            raw = json.loads(cand.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cand}: not valid JSON ({e})") from None
        if isinstance(raw, dict) and _config_kind(raw) != "unknown":
            return _fields_from_config_json(cand)
    return None


def read_state_dict(path: str | os.PathLike, *, use_ema: bool | None = None) -> tuple[dict, dict | None, str]:
    """Any supported DiT checkpoint -> (state dict with our names, config fields found on disk or None, source)."""
    path = Path(path)
    _require_exists(path)
    if path.is_dir():
        if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
            path = path / "transformer"  # a diffusers pipeline directory: its DiT lives in transformer/
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"{path}: directory has no config.json (expected a diffusers "
                                  "WanTransformer3DModel or an original Wan model directory)")
        fields = _fields_from_config_json(cfg_path)
        sd = _read_weights_in_dir(path)
        return normalise_keys(_only_tensors(sd, str(path))), fields, str(path)
    obj, meta = read_tensor_file(path)
    # safetensors hold a flat state dict; pickles may be training containers
    sd = obj if path.suffix == ".safetensors" else _unwrap_container(obj, str(path), use_ema)
    if "inferix_config" in meta:  # written by save_dit
        fields = wan_config_from_wan(json.loads(meta["inferix_config"]), f"{path} metadata")
    else:
        fields = _sidecar_fields(path)
    return normalise_keys(sd), fields, str(path)


def load_dit(path: str | os.PathLike, *, config: WanDiTConfig | dict | None = None, device="cpu",
             dtype: torch.dtype = torch.float32, use_ema: bool | None = None,
             lora: str | os.PathLike | dict | None = None, lora_alpha: float | None = None,
             lora_scale: float = 1.0) -> CausalWanDiT:
    """Load a causal Wan DiT from any supported checkpoint (see the module docstring).

    config: a WanDiTConfig is used as is; a dict overrides fields of the config found on disk or inferred
        from shapes (e.g. ``{"text_len": 16}`` for a diffusers directory, whose config does not record it).
    use_ema: for training containers, prefer ``generator_ema`` (None/True, when present) or ``generator`` (False).
    lora: a LoRA file (LongLive ``lora.pt``) or state dict merged into the weights before the model is built.
    """
    sd, fields, source = read_state_dict(path, use_ema=use_ema)
    if lora is not None:
        from .lora import load_lora_state_dict, merge_lora
        lora_sd = lora if isinstance(lora, dict) else load_lora_state_dict(lora)
        sd = merge_lora(dict(sd), lora_sd, alpha=lora_alpha, scale=lora_scale, out_dtype=dtype,
                        source="lora state dict" if isinstance(lora, dict) else str(lora))
    if isinstance(config, WanDiTConfig):
        cfg = config
    elif config is not None and not isinstance(config, dict):
        raise TypeError(f"config must be a WanDiTConfig, a dict or None, got {type(config).__name__}")
    elif fields is not None:
        cfg = _make_config({**fields, **(config or {})}, source)
    else:
        cfg = infer_dit_config(sd, source, overrides=config)
    return build_dit(sd, cfg, device=device, dtype=dtype, source=source)


def save_dit(model: CausalWanDiT, path: str | os.PathLike) -> Path:
    """Write weights (our names) and config so ``load_dit`` reads them back.

    A path ending in ``.safetensors`` gives that file (config in its metadata and in ``<stem>.json``);
    any other path is a directory in the original Wan layout: ``diffusion_pytorch_model.safetensors`` +
    ``config.json``. Returns the weights file written.
    """
    from safetensors.torch import save_file
    path = Path(path)
    cfg = {"_class_name": "WanModel", "model_type": "t2v", **model.config.to_dict()}
    cfg_json = json.dumps(cfg, indent=2, sort_keys=True)
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        weights, cfg_file = path, path.with_suffix(".json")
    else:
        path.mkdir(parents=True, exist_ok=True)
        weights, cfg_file = path / "diffusion_pytorch_model.safetensors", path / "config.json"
    sd = OrderedDict((k, v.detach().contiguous().cpu()) for k, v in model.state_dict().items())
    save_file(sd, str(weights), metadata={"format": "pt", "inferix_config": cfg_json})
    cfg_file.write_text(cfg_json + "\n")
    return weights


def load_pipeline_dir(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype = torch.float32,
                      text_len: int = WAN_TEXT_LEN, vae_dtype: torch.dtype | None = None,
                      text_dtype: torch.dtype | None = None):
    """A diffusers Wan pipeline directory -> (dit, vae, text_encoder).

    Expects ``model_index.json`` and the transformer/, vae/, text_encoder/, tokenizer/ sub-directories.
    """
    from .text_encoder import UMT5TextEncoder
    from .vae import WanVAE
    path = Path(path)
    _require_exists(path, "pipeline directory")
    if not (path / "model_index.json").exists():
        raise CheckpointError(f"{path}: not a diffusers pipeline directory (no model_index.json)")
    absent = [d for d in ("transformer", "vae", "text_encoder", "tokenizer") if not (path / d).is_dir()]
    if absent:
        raise CheckpointError(f"{path}: pipeline directory lacks sub-directories {absent}")
    dit = load_dit(path / "transformer", config={"text_len": text_len}, device=device, dtype=dtype)
    vae = WanVAE.from_pretrained(path / "vae", device=device, dtype=vae_dtype or dtype)
    text = UMT5TextEncoder.from_dir(path, text_len=text_len, device=device, dtype=text_dtype or dtype)
    if text.text_dim != dit.config.text_dim:
        raise CheckpointError(f"{path}: text encoder width {text.text_dim} != DiT text_dim {dit.config.text_dim}")
    return dit, vae, text
