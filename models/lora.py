"""LoRA weights merged into a DiT state dict (LongLive ships a base generator plus a PEFT LoRA on every Linear
of the attention blocks)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .wan_keys import _WRAPPER_SEGMENTS, diffusers_to_wan_key
from .tensor_files import CheckpointError, _only_tensors, read_tensor_file

_LORA_RE = re.compile(r"^(?P<base>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[A-Za-z0-9_-]+)?\.weight$")


def load_lora_state_dict(path: str | os.PathLike) -> dict:
    """A LoRA file -> flat {key: tensor}.

    LongLive stores ``{'generator_lora': peft_state_dict, 'critic_lora': ..., 'step': ...}``; flat files work too.
    """
    path = Path(path)
    obj, _ = read_tensor_file(path)
    if "generator_lora" in obj and isinstance(obj["generator_lora"], dict):
        obj = obj["generator_lora"]
    return _only_tensors(obj, str(path))


def merge_lora(sd: dict, lora_sd: dict, *, alpha: float | None = None, scale: float = 1.0,
               out_dtype: torch.dtype | None = None, source: str = "lora") -> dict:
    """W += scale * (alpha / rank) * B @ A for every LoRA pair, in float32, into our-named ``sd`` (in place).

    LoRA keys may carry PEFT's ``base_model.model.`` and the wrapper's ``model.`` prefixes, an adapter name
    (``lora_A.default.weight``) and diffusers names; ``lora_down``/``lora_up`` (+ ``.alpha``) are accepted too.
    alpha None means alpha == rank (LongLive's configs: rank 256, alpha 256), unless the file stores ``.alpha``.
    Merged weights get ``out_dtype`` (default: the base weight's dtype), so a bf16 base merged for a float32
    model is not rounded to bf16 after the merge.
    """
    pairs: dict[str, dict] = {}
    stray = []
    for k, v in lora_sd.items():
        kk = k
        for seg in _WRAPPER_SEGMENTS:
            kk = kk.replace(seg, "")
        for prefix in ("base_model.model.", "model.diffusion_model.", "model.", "transformer.", "diffusion_model."):
            if kk.startswith(prefix):
                kk = kk[len(prefix):]
        if kk.endswith(".alpha") and v.numel() == 1:
            pairs.setdefault(kk[:-len(".alpha")], {})["alpha"] = float(v)
            continue
        m = _LORA_RE.match(kk)
        if not m:
            stray.append(k)
            continue
        kind = {"lora_down": "A", "lora_up": "B", "lora_A": "A", "lora_B": "B"}[m.group("kind")]
        pairs.setdefault(m.group("base"), {})[kind] = v
    if stray:
        raise CheckpointError(f"{source}: keys that are not LoRA A/B weights: {sorted(stray)[:20]}")
    problems = []
    for base, p in sorted(pairs.items()):
        target = diffusers_to_wan_key(base + ".weight")
        if "A" not in p or "B" not in p:
            problems.append(f"{base}: has only {sorted(set(p) - {'alpha'})}")
            continue
        if target not in sd:
            problems.append(f"{base}: no base weight {target}")
            continue
        a, b, w = p["A"].float(), p["B"].float(), sd[target]
        rank = a.shape[0]
        if b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(w.shape):
            problems.append(f"{base}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit weight {tuple(w.shape)}")
            continue
        al = p.get("alpha", alpha if alpha is not None else rank)
        sd[target] = (w.float() + (scale * al / rank) * (b @ a)).to(out_dtype or w.dtype)
    if problems:
        raise CheckpointError(f"{source}: LoRA does not fit the model: " + "; ".join(problems))
    if not pairs:
        raise CheckpointError(f"{source}: no LoRA weights found")
    return sd


