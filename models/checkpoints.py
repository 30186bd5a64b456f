"""Checkpoint formats of the causal Wan DiT: detection, key renaming, config inference, LoRA merge, saving.

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
import math
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .tensor_files import CheckpointError, _only_tensors, _require_exists, read_tensor_file
from .wan_dit import PRESETS, CausalWanDiT, WanDiTConfig

__all__ = [
    "CheckpointError", "load_dit", "save_dit", "load_pipeline_dir", "read_tensor_file", "read_state_dict",
    "diffusers_to_wan_key", "wan_config_from_diffusers", "wan_config_from_wan", "infer_dit_config",
]

# Wrapper module names that training frameworks splice into parameter names (FSDP, activation
# checkpointing, torch.compile); they never belong to the model itself.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Containers used by Self-Forcing / CausVid / LongLive training checkpoints, in the order they are tried.
_CONTAINER_KEYS_EMA = ("generator_ema", "generator", "model", "state_dict")
_CONTAINER_KEYS = ("generator", "generator_ema", "model", "state_dict")
# Wan/Self-Forcing config keys that describe inference or other model variants, not tensor shapes.
_WAN_IGNORED_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "model_type", "window_size",
                     "local_attn_size", "sink_size", "num_frame_per_block", "independent_first_frame"}
_WAN_RENAMED_KEYS = {"rope_max_seq_len": "rope_max_frames"}
# Wan pipelines pad the T5 output to 512 tokens; diffusers configs do not record it.
WAN_TEXT_LEN = 512
# The constructor defaults of the original WanModel: its config.json leaves out what the defaults give
# (patch_size, text_dim, qk_norm, cross_attn_norm are never written there).
_WAN_MODEL_DEFAULTS = dict(patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=2048, ffn_dim=8192, freq_dim=256,
                           text_dim=4096, out_dim=16, num_heads=16, num_layers=32, qk_norm=True,
                           cross_attn_norm=True, eps=1e-6)


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
# key names and configs
# ---------------------------------------------------------------------------------------------------
# diffusers WanTransformer3DModel -> original Wan / Self-Forcing names. Each rule renames a prefix; the
# parameter suffix (weight / bias) is kept. Checked against diffusers' own converter (loaders/single_file_utils).
_ATTN_RENAMES = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "norm_q": "norm_q", "norm_k": "norm_k"}
_TOP_RENAMES = {
    "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
    "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
    "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
    "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
    "condition_embedder.time_proj.": "time_projection.1.",
    "proj_out.": "head.head.",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def diffusers_to_wan_key(key: str) -> str:
    """Rename one diffusers ``WanTransformer3DModel`` key to our name; unknown keys come back unchanged."""
    if key == "scale_shift_table":
        return "head.modulation"
    for old, new in _TOP_RENAMES.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = _BLOCK_RE.match(key)
    if not m:
        return key
    n, rest = m.groups()
    if rest == "scale_shift_table":
        return f"blocks.{n}.modulation"
    for attn, ours in (("attn1.", "self_attn."), ("attn2.", "cross_attn.")):
        if rest.startswith(attn):
            sub = rest[len(attn):]
            for old, new in _ATTN_RENAMES.items():
                if sub.startswith(old + "."):
                    return f"blocks.{n}.{ours}{new}{sub[len(old):]}"
            return key
    # diffusers calls the affine cross-attention norm "norm2" (ours: norm3); its norm1/norm3 have no tensors
    if rest.startswith("norm2."):
        return f"blocks.{n}.norm3.{rest[len('norm2.'):]}"
    if rest.startswith("ffn.net.0.proj."):
        return f"blocks.{n}.ffn.0.{rest[len('ffn.net.0.proj.'):]}"
    if rest.startswith("ffn.net.2."):
        return f"blocks.{n}.ffn.2.{rest[len('ffn.net.2.'):]}"
    return key


def _looks_diffusers(keys) -> bool:
    return any(k.startswith("condition_embedder.") or k == "scale_shift_table" or ".attn1." in k for k in keys)


def _strip_prefix_if_all(sd: dict, prefix: str) -> dict:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def normalise_keys(sd: dict) -> dict:
    """Any supported naming -> ours: drop wrapper segments and container prefixes, rename diffusers keys."""
    out = {}
    for k, v in sd.items():
        for seg in _WRAPPER_SEGMENTS:
            k = k.replace(seg, "")
        out[k] = v
    # Self-Forcing / CausVid / LongLive wrap the DiT as `.model`; ComfyUI-style files as `model.diffusion_model`
    for prefix in ("model.diffusion_model.", "diffusion_model.", "model.", "transformer."):
        out = _strip_prefix_if_all(out, prefix)
    if _looks_diffusers(out):
        out = {diffusers_to_wan_key(k): v for k, v in out.items()}
    return out


def wan_config_from_diffusers(cfg: dict, source: str = "config") -> dict:
    """A diffusers ``WanTransformer3DModel`` config -> WanDiTConfig fields (text_len: Wan's 512)."""
    if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
        raise CheckpointError(f"{source}: image-conditioned Wan transformers (image_dim / added_kv_proj_dim set) "
                              "are not supported; only text-to-video DiTs are")
    qk = cfg.get("qk_norm", "rms_norm_across_heads")
    if qk not in ("rms_norm_across_heads", None):
        raise CheckpointError(f"{source}: qk_norm {qk!r} is not supported (only 'rms_norm_across_heads' or null)")
    try:
        heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
        out = dict(dim=heads * head_dim, num_heads=heads, num_layers=int(cfg["num_layers"]),
                   ffn_dim=int(cfg["ffn_dim"]), in_dim=int(cfg.get("in_channels", 16)),
                   out_dim=int(cfg.get("out_channels") or cfg.get("in_channels", 16)),
                   patch_size=tuple(cfg.get("patch_size", (1, 2, 2))), freq_dim=int(cfg.get("freq_dim", 256)),
                   text_dim=int(cfg.get("text_dim", 4096)), text_len=WAN_TEXT_LEN, eps=float(cfg.get("eps", 1e-6)),
                   qk_norm=qk is not None, cross_attn_norm=bool(cfg.get("cross_attn_norm", True)),
                   rope_max_frames=int(cfg.get("rope_max_seq_len", 1024)))
    except KeyError as e:
        raise CheckpointError(f"{source}: diffusers config lacks {e}") from None
    return out


def wan_config_from_wan(cfg: dict, source: str = "config") -> dict:
    """An original Wan / Self-Forcing config (or one written by ``save_dit``) -> WanDiTConfig fields."""
    if "model_kwargs" in cfg and isinstance(cfg["model_kwargs"], dict):  # Self-Forcing style run config
        cfg = cfg["model_kwargs"]
    mt = cfg.get("model_type", "t2v")
    if mt != "t2v":
        raise CheckpointError(f"{source}: model_type {mt!r} is not supported; only 't2v' DiTs are")
    ws = cfg.get("window_size", (-1, -1))
    if tuple(ws) != (-1, -1):
        raise CheckpointError(f"{source}: window_size {ws} (local attention in the base model) is not supported")
    out = dict(_WAN_MODEL_DEFAULTS)
    for k, v in cfg.items():
        if k in _WAN_IGNORED_KEYS:
            continue
        out[_WAN_RENAMED_KEYS.get(k, k)] = v
    return out


def _config_kind(cfg: dict) -> str:
    if cfg.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in cfg:
        return "diffusers"
    inner = cfg.get("model_kwargs", cfg)
    if isinstance(inner, dict) and "dim" in inner and "num_layers" in inner:
        return "wan"
    return "unknown"


def _fields_from_config_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    kind = _config_kind(cfg)
    if kind == "diffusers":
        return wan_config_from_diffusers(cfg, str(path))
    if kind == "wan":
        return wan_config_from_wan(cfg, str(path))
    raise CheckpointError(f"{path}: neither a diffusers WanTransformer3DModel config nor a Wan config "
                          f"(keys: {sorted(cfg)[:20]})")


def _make_config(fields: dict, source: str) -> WanDiTConfig:
    try:
        return WanDiTConfig.from_dict(fields, what=f"DiT config from {source}")
    except TypeError as e:
        raise CheckpointError(f"{source}: bad DiT config ({e})") from None


def infer_dit_config(sd: dict, source: str = "checkpoint", overrides: dict | None = None) -> WanDiTConfig:
    """Config from tensor shapes. Head count is not visible in shapes: a preset's count when dim matches a
    preset, otherwise Wan's head_dim 128 for large Wan-sized dims; small models need an explicit config."""
    overrides = dict(overrides or {})
    need = ["patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "head.head.weight",
            "blocks.0.ffn.0.weight"]
    absent = [k for k in need if k not in sd]
    if absent:
        raise CheckpointError(f"{source}: cannot infer the DiT config, keys missing: {absent}")
    pe = sd["patch_embedding.weight"]  # [dim, in_dim, pt, ph, pw]
    dim, in_dim, patch = pe.shape[0], pe.shape[1], tuple(pe.shape[2:])
    layers = sorted({int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))})
    fields = dict(dim=dim, in_dim=in_dim, patch_size=patch, num_layers=len(layers),
                  ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], freq_dim=sd["time_embedding.0.weight"].shape[1],
                  text_dim=sd["text_embedding.0.weight"].shape[1],
                  out_dim=sd["head.head.weight"].shape[0] // math.prod(patch),
                  qk_norm="blocks.0.self_attn.norm_q.weight" in sd, cross_attn_norm="blocks.0.norm3.weight" in sd)
    if "action_embedding.weight" in sd:
        fields["num_actions"] = sd["action_embedding.weight"].shape[0]
    if "num_heads" not in overrides:
        # only real Wan sizes: a small model matching the tiny preset's dim may still differ in heads
        preset = next((p for p in PRESETS.values() if p.dim == dim and dim >= 1024), None)
        if preset is not None:
            fields["num_heads"], fields["text_len"] = preset.num_heads, preset.text_len
        elif dim >= 1024 and dim % 128 == 0:  # every Wan2.x DiT uses head_dim 128 and a 512-token text
            fields["num_heads"], fields["text_len"] = dim // 128, WAN_TEXT_LEN
        else:
            raise CheckpointError(
                f"{source}: cannot tell the number of attention heads (or text_len) of a dim-{dim} model from "
                "tensor shapes; pass config=WanDiTConfig(...) or a dict such as {'num_heads': ..., 'text_len': ...}, "
                "or put a config.json next to the file")
    fields.update(overrides)
    return _make_config(fields, source)


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
