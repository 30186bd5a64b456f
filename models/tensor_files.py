"""Reading weight files safely: safetensors, or pickles restricted to tensors and plain containers.

``read_tensor_file`` reads one file; ``torch.load`` only ever runs with ``weights_only=True``, and a pickle that
holds anything else is refused with the file and the offending type named (``CheckpointError``). Used by the
DiT checkpoint loaders (``checkpoints.py``), the VAE and LoRA loaders. ``load_prefixed_strict`` loads one
module's ``prefix.`` tensors of a bundle file, every key and shape checked.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

__all__ = ["CheckpointError", "read_tensor_file", "load_prefixed_strict"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and every offending key."""


def _require_exists(path: Path, what: str = "checkpoint") -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")


def _torch_load(path: Path):
    """torch.load restricted to tensors and plain containers; anything else is refused with the file named."""
    try:
        try:  # mmap avoids a second copy of multi-GB checkpoints; legacy (non-zip) files cannot be mapped
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if m:
            raise CheckpointError(
                f"{path}: refused: the pickle holds a {m.group(1)} object, not only tensors and plain containers "
                "(checkpoints are read with torch.load(weights_only=True) only)") from None
        m = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
        raise CheckpointError(f"{path}: refused: not a tensors-only torch checkpoint "
                              f"({m.group(1).strip() if m else text.splitlines()[0]})") from None
    except (EOFError, OSError, RuntimeError, IndexError, KeyError, ValueError, TypeError) as e:
        # a file that is no checkpoint at all (text, another format) fails inside the unpickler in many ways
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None


def read_tensor_file(path: str | os.PathLike) -> tuple[dict, dict]:
    """One weights file -> (top-level object as a dict, safetensors metadata or {}).

    ``.safetensors`` files give their tensors; pickles give whatever plain containers they hold (validated later).
    """
    path = Path(path)
    _require_exists(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors (or a training container holding one), "
                              f"found a {type(obj).__name__}")
    return obj, {}


def _only_tensors(sd: dict, source: str) -> dict:
    bad = [f"{k} ({type(v).__name__})" for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: the state dict holds non-tensor values, refused: {', '.join(bad[:20])}"
                              + (f" ... and {len(bad) - 20} more" if len(bad) > 20 else ""))
    return sd


def load_prefixed_strict(module: torch.nn.Module, sd: dict, prefix: str, source) -> None:
    """Load the tensors of ``sd`` under ``prefix`` (e.g. "dit.") into ``module``: missing or unexpected keys raise
    KeyError, a shape mismatch ValueError, each naming the key as the file has it."""
    own = module.state_dict()
    mine = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    missing, unexpected = sorted(set(own) - set(mine)), sorted(set(mine) - set(own))
    if missing or unexpected:
        raise KeyError(f"{source}: missing keys {[prefix + k for k in missing[:5]]}, unexpected keys "
                       f"{[prefix + k for k in unexpected[:5]]}")
    for k, v in mine.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{source}: {prefix}{k} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)}")
    module.load_state_dict(mine)
