"""Matrix-Game 2.0's model adapter (``models/adapter.py``): a start image, keyboard and mouse input, and the
action modules' caches, told to the engine through the seam.

- **A session** opens from a start image (``init_image``, uint8 [H, W, 3] at the engine's size): the CLIP image
  encoder gives the cross-attention tokens (they take the place of a prompt's text K/V) and the VAE encodes the
  image followed by zero frames into the per-frame image latents, which every pass concatenates with its noisy
  latents and a mask (1 on latent frame 0). ``model_inputs={"image_tokens": [1, N, D], "image_latents":
  [F, 16, h, w]}`` gives both directly (a replay, or a cached encode). The first 15 latent frames are encoded
  (model option ``image_frames``; all of a shorter session, as the release encodes its whole clip); later frames
  reuse the last encoded latent (an approximation: the release encodes every frame of its clip up front, which
  a stream of thousands of frames could neither wait for nor hold).
- **An action** is one pixel frame's input: ``{"keys": ..., "mouse": [pitch, yaw]}`` where keys is a string of
  key letters (``"wa"``), a list of key names (``["forward", "left"]``) or a multi-hot list; ``mouse`` is the
  camera delta (vertical, horizontal). A latent frame's condition is the tuple of the actions of the pixel frames
  it shows; a block looks back at the conditions of the 3 latent frames before it (each latent frame reads the
  12 pixel frames before its last one).
- **Caches**: each action module keeps one keyboard key/value per frame and one mouse key/value per frame and
  spatial token; they are groups of the page pool (``cache_groups``), so they roll, fork and free with the pages.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from ..adapter import ModelAdapter, ModelOption
from .dit import FrameConditions

__all__ = ["MatrixGameAdapter", "KEYSETS", "actions_from_sequences"]

# key names and letters of each variant's keyboard vector, in its order (the release's action layouts and its
# interactive keys)
KEYSETS = {
    4: (("forward", "w"), ("back", "s"), ("left", "a"), ("right", "d")),
    2: (("forward", "w"), ("back", "s")),
    7: (("nomove", "q"), ("jump", "w"), ("slide", "s"), ("turnleft", "z"), ("turnright", "c"), ("leftside", "a"),
        ("rightside", "d")),
}
# letters that turn the camera on a variant whose keyboard has no such key (GTA drive steers with the mouse's yaw)
STEER = {2: {"a": (0.0, -0.1), "d": (0.0, 0.1)}}
# the key held when none is (Temple Run is trained on one-hot input: "nomove" when the player does nothing)
IDLE_KEY = {7: "nomove"}
MAX_MOUSE = 1.0  # the release steers with deltas of 0.1; larger ones are far outside what it was trained on


def _positive_int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, (numbers.Integral, str)):
        raise ValueError(f"must be a positive int, got {v!r}")
    n = int(v)
    if n < 1:
        raise ValueError(f"must be a positive int, got {v!r}")
    return n


def _plain(v):
    """numpy arrays and scalars, tuples and tensors as plain Python lists and numbers."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    return v


def _numbers(keys) -> bool:
    return isinstance(keys, list) and bool(keys) and all(isinstance(k, (bool, numbers.Real)) for k in keys)


def _at_least_two(v) -> int:
    n = _positive_int(v)
    if n < 2:  # frame 0 is the image's own latent; later frames need one of a zero frame after it
        raise ValueError(f"must be at least 2 (the image and one frame after it), got {v!r}")
    return n


class MatrixGameAdapter(ModelAdapter):
    options = (ModelOption("image_frames", lambda v: None if v is None else _at_least_two(v), None,
                           "latent frames of image conditioning encoded at session start (default 15, or the "
                           "session's own when fewer; later frames reuse the last)"),)

    def __init__(self, bundle):
        super().__init__(bundle)
        self.act = bundle.dit.config.action_config
        self.keys = KEYSETS.get(self.act.keyboard_dim_in) if self.act is not None and self.act.enable_keyboard else ()
        if self.act is not None and self.act.enable_keyboard and self.keys is None:
            self.keys = tuple((f"key{i}", None) for i in range(self.act.keyboard_dim_in))

    def check_engine(self, *, cuda_graphs: bool = False, parallel=None, positions: str = "absolute") -> None:
        # the action caches hold keys rotated at absolute frame indices, as the release's do
        if positions != "absolute":
            raise ValueError(f"model {self.bundle.name!r} runs with absolute frame positions only, got "
                             f"positions={positions!r}")
        # the action modules build their per-row context on the host each pass, and split no tokens across ranks
        if cuda_graphs:
            raise ValueError(f"model {self.bundle.name!r} does not run with CUDA graphs yet (cuda_graphs=False)")
        if parallel is not None:
            raise ValueError(f"model {self.bundle.name!r} does not run under sequence or CFG parallelism yet")

    # ---- controls -----------------------------------------------------------------------------------------
    @property
    def num_keys(self) -> int:
        return self.act.keyboard_dim_in if self.act is not None and self.act.enable_keyboard else 0

    @property
    def has_mouse(self) -> bool:
        return self.act is not None and self.act.enable_mouse

    takes_image = True
    takes_prompt = False  # the image tokens are the only cross-attention context
    takes_init_frames = False  # it starts from one image (init_image), not from frames to continue

    def controls(self) -> dict:
        """What a user interface offers: key names with their letters, and whether a mouse steers the camera."""
        return {"type": "keyboard_mouse", "keys": [{"name": n, "letter": c} for n, c in self.keys],
                "mouse": self.has_mouse}

    def parse_action(self, action):
        """{"keys": "wa" | ["forward", "a", ...] | [0/1, ...], "mouse": [pitch, yaw]} (either part optional), a
        string of key letters, or None (no input) -> a tuple of floats: the keyboard vector, then the mouse delta.
        Numpy values and bools are taken as numbers; keys are 0 or 1 (multi-hot), mouse deltas within +-1."""
        if action is None:
            action = {}
        if isinstance(action, str):
            action = {"keys": action}
        if not isinstance(action, dict):
            raise ValueError(f"an action of {self.bundle.name!r} is a dict with 'keys' and/or 'mouse' (or a string of "
                             f"key letters), got {action!r}")
        unknown = set(action) - {"keys", "keyboard", "mouse"}
        if unknown:
            raise ValueError(f"unknown action fields {sorted(unknown)}; an action has 'keys' and 'mouse'")
        keys = _plain(action.get("keys", action.get("keyboard")))
        mouse = _plain(action.get("mouse"))
        kb, steer = self._keys(keys)
        ms = [0.0] * (self.act.mouse_dim_in if self.has_mouse else 0)
        if mouse is not None:
            values = mouse if isinstance(mouse, list) else [mouse]
            nums = [self._number(v, "mouse") for v in values]
            if not self.has_mouse:
                if any(nums):
                    raise ValueError(f"model {self.bundle.name!r} takes no mouse input (keyboard only)")
            elif len(nums) != len(ms) or not isinstance(mouse, list):
                raise ValueError(f"mouse must be [vertical, horizontal] camera deltas, got {mouse!r}")
            else:
                if any(abs(v) > MAX_MOUSE for v in nums):
                    raise ValueError(f"mouse deltas must be within +-{MAX_MOUSE} (the release steers with 0.1), "
                                     f"got {mouse!r}")
                ms = nums
        elif steer is not None:
            ms = list(steer)
        idle = IDLE_KEY.get(self.num_keys)
        if idle is not None and not any(kb) and not _numbers(keys):  # a vector given as numbers is taken as it is
            kb[[n for n, _ in self.keys].index(idle)] = 1.0
        return tuple(kb + ms)

    def _keys(self, keys) -> tuple[list, tuple | None]:
        """The keyboard vector of the keys given, and the camera turn of a steering letter (GTA drive) or None."""
        kb = [0.0] * self.num_keys
        if keys is None or keys == "" or keys == []:
            return kb, None
        names = [n for n, _ in self.keys]
        letters = {c: i for i, (_, c) in enumerate(self.keys) if c}
        steer_keys = STEER.get(self.num_keys, {})
        steer = None
        if _numbers(keys):
            if len(keys) != self.num_keys:
                raise ValueError(f"keys as numbers must be {self.num_keys} values (multi-hot {names}), got {keys!r}")
            kb = [self._number(v, "keys") for v in keys]
            if any(v not in (0.0, 1.0) for v in kb):
                raise ValueError(f"key values must be 0 or 1, got {keys!r}")
            return kb, None
        if isinstance(keys, str):
            keys = [ch for ch in keys.lower() if not ch.isspace()]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"keys must be a string of letters, a list of key names {names} or a list of "
                             f"{self.num_keys} numbers, got {keys!r}")
        if not self.num_keys:
            raise ValueError(f"model {self.bundle.name!r} takes no keyboard input")
        for k in keys:
            k = k.strip().lower()
            if k in names:
                kb[names.index(k)] = 1.0
            elif k in letters:
                kb[letters[k]] = 1.0
            elif k in steer_keys:
                steer = steer_keys[k]
            else:
                takes = ", ".join([f"{c} ({n})" for n, c in self.keys if c] +
                                  [f"{c} (camera {'left' if v[1] < 0 else 'right'})" for c, v in steer_keys.items()])
                raise ValueError(f"unknown key {k!r}; {self.bundle.name!r} takes {takes}")
        return kb, steer

    @staticmethod
    def _number(v, what: str) -> float:
        if not isinstance(v, (bool, numbers.Real)) or not np.isfinite(float(v)):
            raise ValueError(f"{what} values must be finite numbers, got {v!r}")
        return float(v)

    def idle_action(self):
        return (self.parse_action({}),)

    def latent_condition(self, pixel_actions: list):
        return tuple(tuple(a) for a in pixel_actions)

    def condition_history(self) -> int:
        return self.act.windows_size if self.act is not None else 0

    # ---- sessions -----------------------------------------------------------------------------------------
    def session_inputs(self, *, init_image=None, model_inputs=None, height: int, width: int, latent_frames):
        b = self.bundle
        cfg = b.dit.config
        h, w = height // b.spatial_ratio, width // b.spatial_ratio
        if model_inputs is not None:
            if init_image is not None:
                raise ValueError("give init_image or model_inputs, not both")
            unknown = set(model_inputs) - {"image_tokens", "image_latents"}
            if unknown:
                raise ValueError(f"unknown model_inputs {sorted(unknown)}; takes image_tokens and image_latents")
            tokens, lat = model_inputs.get("image_tokens"), model_inputs.get("image_latents")
            if not torch.is_tensor(tokens) or tokens.dim() != 3 or tokens.shape[0] != 1 \
                    or tokens.shape[-1] != cfg.image_dim:
                raise ValueError(f"model_inputs image_tokens must be a tensor [1, N, {cfg.image_dim}], got "
                                 f"{getattr(tokens, 'shape', type(tokens).__name__)}")
            want = (cfg.out_dim, h, w)
            if not torch.is_tensor(lat) or lat.dim() != 4 or tuple(lat.shape[1:]) != want or not len(lat):
                raise ValueError(f"model_inputs image_latents must be a tensor [F, {cfg.out_dim}, {h}, {w}], got "
                                 f"{getattr(lat, 'shape', type(lat).__name__)}")
            return tokens.float(), {"image_latents": lat.float()}
        if init_image is None:
            raise ValueError(f"model {b.name!r} starts from an image: pass init_image (uint8 [{height}, {width}, 3]; "
                             f"CLI --image)")
        img = np.asarray(init_image)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"init_image must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
        if img.shape[:2] != (height, width):
            raise ValueError(f"init_image is {img.shape[1]}x{img.shape[0]}, the engine runs {width}x{height}: resize "
                             f"or crop it to {width}x{height}")
        if b.image_encoder is None:
            raise ValueError(f"model {b.name!r} has no image encoder (CLIP); load one with it, or pass model_inputs")
        if b.decoder is None or not hasattr(b.decoder, "encode"):
            raise ValueError(f"model {b.name!r} has no VAE to encode the start image; load one, or pass model_inputs")
        n = self.image_frames(latent_frames)
        with torch.no_grad():
            tokens = b.image_encoder.encode_image(img).float()  # [1, N, D]
            if hasattr(b.decoder, "encode_start_image"):  # the image, then frames of exact zeros in [-1, 1]
                lat = b.decoder.encode_start_image(img, n)[0].float()  # [F, C, h, w]
            else:  # an encoder of uint8 frames only: mid-gray stands for zero
                pixels = np.full((b.pixel_frames(n), height, width, 3), 128, dtype=np.uint8)
                pixels[0] = img
                lat = b.decoder.encode(pixels)[0].float()
        return tokens.cpu(), {"image_latents": lat.cpu()}

    def image_frames(self, latent_frames: int | None) -> int:
        """Latent frames of image conditioning encoded at session start: the session's own when it has fewer, else
        the ``image_frames`` option (15: the release's clips are encoded whole, but a stream of thousands of frames
        cannot wait for that, nor hold it; later frames reuse the last)."""
        cap = self.values.get("image_frames") or 15
        return cap if latent_frames is None else min(cap, latent_frames)

    # ---- passes -------------------------------------------------------------------------------------------
    def cache_groups(self, page_tokens: int) -> dict:
        return self.bundle.dit.cache_groups(page_tokens)

    def _pixel_sequence(self, conds: list, first: int) -> dict:
        """{pixel frame: action} from per-latent-frame conditions of latent frames first, first + 1, ..."""
        r = self.act.vae_time_compression_ratio
        out = {}
        for i, c in enumerate(conds):
            f = first + i
            px = [0] if f == 0 else list(range(r * f - r + 1, r * f + 1))
            c = list(c)
            for j, p in enumerate(px):
                out[p] = c[min(j, len(c) - 1)]
        return out

    def _windows(self, r, frames: list):
        past = list(r.past_actions or [])
        block = list(r.actions) if r.actions is not None else [self.idle_action()] * len(frames)
        first = frames[0] - len(past)
        seq = self._pixel_sequence(past + block, first)
        W = self.act.window
        ratio = self.act.vae_time_compression_ratio
        lo = min(seq)
        rows = []
        for f in frames:
            idx = [max(0, ratio * f - W + i) for i in range(W)]
            rows.append([seq.get(p, seq[max(lo, min(p, max(seq)))]) for p in idx])
        return torch.tensor(rows, dtype=torch.float32)  # [F, W, K + M]

    def pass_inputs(self, kind: str, rows: list, states: list, nframes: int, device):
        cfg = self.bundle.dit.config
        concat, kbs, mss = [], [], []
        for r, st in zip(rows, states):
            if kind == "recache":
                raise ValueError(f"session {r.sid}: {self.bundle.name!r} takes no prompt, so nothing to recache")
            frames = list(range(r.frame_start, r.frame_start + nframes))
            lat = st.inputs.get("image_latents")
            if lat is None:
                raise ValueError(f"session {r.sid} has no image conditioning (open it with init_image)")
            idx = torch.tensor([min(f, lat.shape[0] - 1) for f in frames])
            img = lat[idx]
            mask = torch.zeros(len(frames), cfg.cond_channels - cfg.out_dim, *img.shape[-2:])
            mask[[i for i, f in enumerate(frames) if f == 0]] = 1.0
            concat.append(torch.cat([mask, img], dim=1))
            if self.act is not None:
                win = self._windows(r, frames)
                kbs.append(win[..., :self.num_keys])
                mss.append(win[..., self.num_keys:])
        K = self.num_keys
        return FrameConditions(
            concat=torch.stack(concat).to(device),
            keyboard=torch.stack(kbs).to(device) if K else None,
            mouse=torch.stack(mss).to(device) if self.has_mouse else None)


def actions_from_sequences(keyboard, mouse=None) -> list:
    """Per-pixel-frame action dicts from a keyboard array [P, K] and a mouse array [P, 2] (or None)."""
    kb = np.asarray(keyboard, dtype=np.float64)
    ms = None if mouse is None else np.asarray(mouse, dtype=np.float64)
    out = []
    for i in range(kb.shape[0]):
        a = {"keys": kb[i].tolist()}
        if ms is not None:
            a["mouse"] = ms[i].tolist()
        out.append(a)
    return out

