"""Names and configs of the causal Wan DiT's checkpoint formats: key renaming (diffusers and wrapped training
checkpoints -> our names) and config translation (diffusers / original Wan config.json, or tensor shapes ->
``WanDiTConfig``). Reading files is ``checkpoints.py``'s job; nothing here touches the disk except
``_fields_from_config_json``, which reads one config.json.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from .config import read_json_object
from .tensor_files import CheckpointError
from .wan_dit import PRESETS, WanDiTConfig

__all__ = ["WAN_TEXT_LEN", "diffusers_to_wan_key", "normalise_keys", "wan_config_from_diffusers", "wan_config_from_wan",
           "infer_dit_config"]

# Wrapper module names that training frameworks splice into parameter names (FSDP, activation
# checkpointing, torch.compile); they never belong to the model itself.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
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
    cfg = read_json_object(path, "model config", CheckpointError)
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
