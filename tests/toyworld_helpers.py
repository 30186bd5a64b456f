"""Shared pieces of the toy-world model tests: the shipped bundle's path and a micro training config."""
from pathlib import Path

from inferix.models.toyworld.train import TrainConfig
from inferix.models.wan_dit import WanDiTConfig


WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights" / "toyworld.json"


def micro_config(**kw) -> TrainConfig:
    model = WanDiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=1, in_dim=3, out_dim=3, patch_size=(1, 8, 8),
                         freq_dim=16, text_dim=8, text_len=8, num_actions=5, prediction="x0").to_dict()
    base = dict(batch=2, clip_blocks=2, block_frames=2, lr=3e-3, warmup=2, max_start=20, model=model,
                checkpoint_every_s=1e9)
    base.update(kw)
    return TrainConfig(**base)
