"""The toy world: a deterministic 64x64 simulator (simulator.py), the trainer of the small action- and
text-conditioned pixel-space DiT that ships as the default model (train.py), its metrics (metrics.py) and an
engine-free rollout the tests use as an oracle (eval.py). The commands that drive an engine live in app/toyworld/.
See docs/toyworld.md."""
from .simulator import ACTIONS, THEMES, simulate, theme_of

__all__ = ["ACTIONS", "THEMES", "simulate", "theme_of"]
