"""Shared pieces of the commands that add a trained part to a bundle (``inferix train toyworld-decoder``,
``toyworld-corrector``): a config dataclass as command-line options, and the source bundle."""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from inferix.models.bundle import WEIGHTS_DIR

__all__ = ["add_config_options", "config_from_options", "source_bundle"]


def add_config_options(ap: argparse.ArgumentParser, cls) -> None:
    """One option per field of the dataclass ``cls`` (``--field-name``), typed and defaulted as the field."""
    for k, v in asdict(cls()).items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)


def config_from_options(ap: argparse.ArgumentParser, args, cls):
    """The ``cls`` the options give; a value the config refuses is a usage error naming it."""
    try:
        return cls(**{k: getattr(args, k) for k in asdict(cls())})
    except ValueError as e:
        ap.error(str(e))


def source_bundle(model: str) -> Path:
    """'toyworld' (the shipped bundle) or a bundle .json path, which must exist."""
    src = WEIGHTS_DIR / "toyworld.json" if model == "toyworld" else Path(model)
    if not src.exists():
        raise FileNotFoundError(f"bundle not found: {src}")
    return src
