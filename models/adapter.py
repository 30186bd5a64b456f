"""The model-adapter seam: what is special about a model, told to the engine through one object.

The engine core (pages, scheduler, runner, engine) knows no model by name. A bundle carries an adapter
(``ModelBundle.adapter``); the engine configures it once with the user's model options and then asks it, at fixed
points of the block loop, for what only the model knows:

- ``start_frames(prompt, seed)``: the frames a session starts from when none are given (None: from nothing);
- ``cache_groups(page_tokens)``: further per-frame caches beside the self-attention K/V (an action module's
  keyboard and mouse caches), allocated as groups of the page pool and living and dying with their page;
- ``lanes()``: extra per-frame cache lanes beside the stream's own self-attention K/V. A lane has the shape of
  the stream's K/V and shares its page ids and lifetime (pool row ``lane * pages + page``), so admission,
  eviction, forks, snapshots and the host tier cover it with the page it belongs to;
- ``extra_rows(x, actions)`` / ``combine(own, extras)``: rows a stream runs beside itself in the same pass (extra
  row j reads and writes lane j + 1), and how their predictions fold into the stream's own;
- ``finish_block(x0s, previous, actions)``: what happens to each finished block's estimate before it is committed;
- ``session_inputs`` / ``parse_action`` / ``latent_condition`` / ``pass_inputs``: what conditions a session (a
  start image, its encoded tokens and latents) and each frame (an action id; keyboard and mouse input), and how a
  batched pass receives them;
- ``options``: the options the model takes (``Engine(model_options={...})``, ``--model-option KEY=VALUE``),
  each parsed and checked here, with a one-line error that names the option.

The defaults are what a plain Wan causal model needs: no start frames, no lanes, no extra rows, the estimate
committed as it is, no options. A model with more to say subclasses ``ModelAdapter`` in its own package (the toy
world: ``models/toyworld/adapter.py``). Nothing here imports the engine.
"""
from __future__ import annotations

import numbers
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

    def check_engine(self, *, cuda_graphs: bool = False, parallel=None, positions: str = "absolute") -> None:
        """Refuse engine features this model cannot run with yet (ValueError naming the feature); called before
        the engine allocates anything."""

    def settings(self) -> dict:
        """The option values in force (plain JSON values): what a profile reports and a snapshot depends on."""
        return dict(self.values)

    # ---- per-session inputs and per-frame conditions ---------------------------------------------------------
    def session_inputs(self, *, init_image=None, model_inputs: dict | None = None, height: int, width: int,
                       latent_frames: int | None) -> tuple:
        """What a new session is conditioned on beyond its prompt: (context embeddings replacing the prompt's,
        or None; a dict of per-session tensors the model's passes read, see ``pass_inputs``). ``init_image``: a
        start image (uint8 [H, W, 3]) for image-conditioned models; ``model_inputs``: the same, already encoded.
        ``latent_frames``: how many the session will make (None: until cancelled). Raises ValueError."""
        if init_image is not None:
            raise ValueError(f"model {self.bundle.name!r} takes no start image (init_image)")
        if model_inputs:
            raise ValueError(f"model {self.bundle.name!r} takes no model_inputs, got {sorted(model_inputs)}")
        return None, {}

    def parse_action(self, action):
        """One pixel frame's user action -> the value the scheduler holds and plans (plain, JSON-able). Here an
        action id, from a name of ``bundle.actions`` or an int; raise ValueError naming what is wrong."""
        names = self.bundle.actions
        if isinstance(action, str):
            if not names or action not in names:
                raise ValueError(f"unknown action {action!r}; this model knows {names}")
            return names.index(action)
        if isinstance(action, bool) or not isinstance(action, numbers.Integral):
            raise ValueError(f"an action is a name ({names}) or an int id, got {action!r}")
        a = int(action)
        n = self.bundle.dit.config.num_actions
        if not n:
            raise ValueError(f"model {self.bundle.name!r} takes no actions")
        if not 0 <= a < n:
            raise ValueError(f"action id {a} out of range 0..{n - 1}")
        return a

    takes_image = False  # sessions open from a start image (init_image)
    takes_prompt = True  # a prompt conditions the model (False: the prompt is ignored and cannot be switched)
    takes_init_frames = True  # a session may continue given frames (init_frames)

    def controls(self) -> dict | None:
        """What a user interface offers to steer a session: ``{"type": "discrete", "values": [names]}`` for a model
        of named actions, None for a model without actions (keyboard-and-mouse models say more)."""
        names = self.bundle.actions
        if names:
            return {"type": "discrete", "values": list(names)}
        n = self.bundle.dit.config.num_actions
        return {"type": "discrete", "values": [str(i) for i in range(n)]} if n else None

    def idle_action(self):
        """The per-latent-frame condition held before any action is given."""
        return 0

    def latent_condition(self, pixel_actions: list):
        """The per-latent-frame condition from the parsed actions of the pixel frames that latent frame shows
        (one for the first latent frame, the VAE's temporal ratio for later ones). Here: the last one's."""
        return pixel_actions[-1]

    def condition_history(self) -> int:
        """How many latent frames before a block the model's per-frame conditions look back at (``Row.past_actions``
        carries their conditions)."""
        return 0

    def pass_inputs(self, kind: str, rows: list, states: list, nframes: int, device):
        """The per-frame conditions of one batched pass, as the model's forward takes them (its ``actions``
        argument): here an action id tensor [B, F] for models with actions, else None. ``states``: the runner's
        per-session tensors of the rows (their ``inputs`` from ``session_inputs``)."""
        import torch
        if not self.bundle.dit.config.num_actions:
            return None
        return torch.tensor([r.actions if r.actions is not None else [0] * nframes for r in rows],
                            dtype=torch.long, device=device)

    # ---- the seam -----------------------------------------------------------------------------------------
    def start_frames(self, prompt: str, seed: int = 0):
        """uint8 [T, H, W, 3] frames a session starts from when none are given, or None (start from nothing)."""
        return None

    def lanes(self) -> int:
        """Extra per-frame cache lanes beside the stream's own K/V (0: none)."""
        return 0

    def cache_groups(self, page_tokens: int) -> dict:
        """Further per-frame caches beside the self-attention K/V: name -> the shape of one page's entry (e.g. an
        action module's keyboard and mouse keys and values). The engine allocates them as groups of its page pool
        (``KVPool.groups``), so they are evicted, shared by forks, moved and snapshotted with their page."""
        return {}

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
