"""The model-adapter seam: what is special about a model, told to the engine through one object.

The engine core (pages, scheduler, runner, engine) knows no model by name. A bundle carries an adapter
(``ModelBundle.adapter``); the engine configures it once with the user's model options and then asks it, at fixed
points of the block loop, for what only the model knows:

- ``start_frames(prompt, seed)``: the frames a session starts from when none are given (None: from nothing);
- ``lanes()``: extra per-frame cache lanes beside the stream's own self-attention K/V. A lane has the shape of
  the stream's K/V and shares its page ids and lifetime (pool row ``lane * pages + page``), so admission,
  eviction, forks, snapshots and the host tier cover it with the page it belongs to;
- ``extra_rows(x, actions)`` / ``combine(own, extras)``: rows a stream runs beside itself in the same pass (extra
  row j reads and writes lane j + 1), and how their predictions fold into the stream's own;
- ``finish_block(x0s, previous, actions)``: what happens to each finished block's estimate before it is committed;
- ``options``: the options the model takes (``Engine(model_options={...})``, ``--model-option KEY=VALUE``),
  each parsed and checked here, with a one-line error that names the option.

The defaults are what a plain Wan causal model needs: no start frames, no lanes, no extra rows, the estimate
committed as it is, no options. A model with more to say subclasses ``ModelAdapter`` in its own package (the toy
world: ``models/toyworld/adapter.py``). Nothing here imports the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["ModelAdapter", "ModelOption", "parse_option_text"]


@dataclass(frozen=True)
class ModelOption:
    """One option a model takes. ``parse`` turns a given value (a command line's string, or a Python value) into
    the option's value, raising ValueError with the reason; ``default`` is used when the option is not given."""
    name: str
    parse: Callable[[object], object]
    default: object = None
    help: str = ""


def parse_option_text(items) -> dict:
    """Command-line ``KEY=VALUE`` items (``--model-option``) -> {KEY: VALUE} (strings, checked by the adapter)."""
    out = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--model-option {item!r}: expected KEY=VALUE")
        if key in out:
            raise ValueError(f"--model-option {key} given twice")
        out[key] = value.strip()
    return out


class ModelAdapter:
    """What a plain Wan causal model needs: nothing beyond the engine's own loop. See the module docstring."""

    options: tuple = ()  # ModelOption, ...

    def __init__(self, bundle):
        self.bundle = bundle
        self.values: dict = {}

    # ---- options ------------------------------------------------------------------------------------------
    def configure(self, given: dict | None = None) -> "ModelAdapter":
        """Parse and check the given model options (unknown names refused); returns self, ready for an engine."""
        known = {o.name: o for o in self.options}
        given = dict(given or {})
        for key in given:
            if key not in known:
                takes = ", ".join(sorted(known)) or "none"
                raise ValueError(f"unknown model option {key!r} for model {self.bundle.name!r} (it takes: {takes})")
        values = {}
        for name, opt in known.items():
            raw = given.get(name, opt.default)
            try:
                values[name] = opt.parse(raw)
            except (TypeError, ValueError) as e:
                raise ValueError(f"model option {name}: {e}") from None
        self.values = values
        self.check()
        return self

    def check(self) -> None:
        """Reject option values this model cannot run with (called by ``configure``); raise ValueError."""

    def settings(self) -> dict:
        """The option values in force (plain JSON values): what a profile reports and a snapshot depends on."""
        return dict(self.values)

    # ---- the seam -----------------------------------------------------------------------------------------
    def start_frames(self, prompt: str, seed: int = 0):
        """uint8 [T, H, W, 3] frames a session starts from when none are given, or None (start from nothing)."""
        return None

    def lanes(self) -> int:
        """Extra per-frame cache lanes beside the stream's own K/V (0: none)."""
        return 0

    def extra_rows(self, x, actions) -> list:
        """Rows run beside a batch of stream rows in the same pass: [(x_j, actions_j)] for extra row j, whose
        inputs are ``x`` [B, F, C, h, w] and ``actions`` [B, F] (or None) as that row sees them. Extra row j
        reads and writes lane j + 1."""
        return []

    def combine(self, own, extras: list):
        """A denoise pass's prediction per stream row from its own [B, ...] and its extra rows' [B, ...] each."""
        return own

    def finish_block(self, x0s: list, previous: list, actions):
        """The estimates [F, C, h, w] of the blocks that just finished denoising, as they are to be committed.
        ``previous``: each stream's last committed latent frame before its block (None when there is none);
        ``actions``: [N, F] per-frame actions of those blocks (None for models without actions)."""
        return x0s
