"""The toy world: a deterministic single-screen 64x64 arena rendered in a few flat colours.

Everything about a world is fixed by its seed and prompt:

- the scene (static for the whole episode, so a place looks the same when the agent comes back): a floor of
  16-px checker tiles in two shades, a 4-px wall around the border, a few rectangular patches (water, rock,
  ice ...) and small items (flowers, cacti, lamps ...), all aligned to a 4-px grid;
- the agent, a 6x6 crimson square that moves 2 px per frame by the player's action and is stopped by the wall;
- the ball, an orange disc of diameter 8 that flies at a constant integer velocity and bounces off the wall.

The prompt picks the theme (palette / time of day) by a keyword; see ``THEMES``. Every pixel of every frame is
one colour of ``palette(theme)``, so "is this pixel close to a simulator colour" is measurable on model output.
Frame t is rendered after applying ``actions[t]`` (the move that leads into frame t), so a model conditioned on
the action of frame t sees the action that explains the change from frame t-1 to frame t.
"""
from __future__ import annotations

import re

import numpy as np

from ..mirrors import MIRRORS as _MIRROR_TABLE, action_permutation

__all__ = ["ACTIONS", "ACTION_DELTAS", "THEMES", "THEME_WORDS", "DEFAULT_THEME", "AGENT_COLOR", "BALL_COLOR",
           "FILLER_WORDS", "SIZE", "WALL", "AGENT_SIZE", "AGENT_SPEED", "BALL_DIAMETER", "theme_of", "palette", "all_colors",
           "random_actions", "action_ids", "World", "simulate", "random_prompt", "draw_sprites", "MIRRORS",
           "mirror_frames", "mirror_actions"]

SIZE = 64  # arena is SIZE x SIZE pixels, the whole screen (no camera)
WALL = 4  # border wall thickness: the agent and the ball stay inside [WALL, SIZE - WALL)
AGENT_SIZE = 6
AGENT_SPEED = 2  # pixels per frame
BALL_DIAMETER = 8
TILE = 16

ACTIONS = ["none", "up", "down", "left", "right"]
ACTION_DELTAS = {0: (0, 0), 1: (0, -1), 2: (0, 1), 3: (-1, 0), 4: (1, 0)}  # (dx, dy) per action id

# The agent and ball colours are the same in every theme and far from every scene colour, so both can be
# found in generated frames by colour alone.
AGENT_COLOR = (220, 20, 60)
BALL_COLOR = (255, 140, 0)

THEMES = {
    # name: floor, tile (second checker shade), wall, patch, item
    "meadow": {"floor": (112, 184, 84), "tile": (96, 164, 72), "wall": (124, 92, 60),
               "patch": (64, 128, 208), "item": (236, 228, 120)},
    "desert": {"floor": (226, 200, 142), "tile": (208, 180, 120), "wall": (150, 100, 64),
               "patch": (150, 140, 130), "item": (60, 140, 80)},
    "forest": {"floor": (60, 110, 50), "tile": (46, 92, 40), "wall": (72, 50, 34),
               "patch": (24, 64, 28), "item": (164, 128, 84)},
    "snow": {"floor": (236, 240, 248), "tile": (214, 224, 240), "wall": (124, 136, 160),
             "patch": (150, 196, 230), "item": (84, 94, 106)},
    "night": {"floor": (30, 36, 64), "tile": (22, 28, 52), "wall": (64, 64, 84),
              "patch": (18, 64, 96), "item": (240, 230, 150)},
}
DEFAULT_THEME = "meadow"
# Words that select a theme (first match in the prompt wins).
THEME_WORDS = {
    "meadow": ["meadow", "grass", "grassy", "field", "park"],
    "desert": ["desert", "sand", "sandy", "dunes", "dry"],
    "forest": ["forest", "woods", "jungle", "trees", "woodland"],
    "snow": ["snow", "snowy", "ice", "icy", "winter", "frozen"],
    "night": ["night", "dark", "midnight", "evening", "moonlit"],
}
# Words without meaning in the world that training prompts are padded with (so that the text encoder learns to
# find the theme word among others).
FILLER_WORDS = ["a", "the", "small", "red", "square", "cube", "explores", "walks", "in", "through", "world",
                "arena", "with", "bouncing", "orange", "ball", "toy", "level", "game", "room", "scene", "quiet"]
_WORD_TO_THEME = {w: t for t, ws in THEME_WORDS.items() for w in ws}


def theme_of(prompt: str) -> str:
    """The theme a prompt selects: the first theme word in it, else ``DEFAULT_THEME``."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    for w in re.findall(r"[a-z]+", prompt.lower()):
        if w in _WORD_TO_THEME:
            return _WORD_TO_THEME[w]
    return DEFAULT_THEME


def palette(theme: str) -> np.ndarray:
    """uint8 [K, 3]: every colour a frame of this theme can contain (scene colours, agent, ball)."""
    if theme not in THEMES:
        raise ValueError(f"unknown theme {theme!r}; choose one of {sorted(THEMES)}")
    return np.array(list(THEMES[theme].values()) + [AGENT_COLOR, BALL_COLOR], dtype=np.uint8)


def all_colors() -> np.ndarray:
    """uint8 [K, 3]: the union of all theme palettes (for a theme-agnostic colour metric)."""
    return np.unique(np.concatenate([palette(t) for t in THEMES]), axis=0)


# The arena is symmetric: its mirror images are worlds of the same kind (the wall is as thick on every side, tiles,
# patches and items sit on a 4-px grid, the agent on a 2-px lattice), played with the actions mirrored too. The
# left-right and top-bottom mirrors ("h", "v") swap the checker's two shades (4 tiles a side); the half turn and
# the diagonal mirrors ("hv", "d", "a") keep them, so only those give frames the simulator itself can make.
# name -> (image axes flipped, counted from the end: -1 is x, -2 is y; whether x and y then swap; the action that
# each action id becomes)
MIRRORS = {name: (axes, transpose, tuple(action_permutation(name, ACTIONS)))
           for name, (axes, transpose, _) in _MIRROR_TABLE.items()}


def _mirror(name: str):
    if name not in MIRRORS:
        raise ValueError(f"unknown mirror {name!r}; choose one of {sorted(MIRRORS)}")
    return MIRRORS[name]


def mirror_frames(frames: np.ndarray, name: str) -> np.ndarray:
    """Frames uint8 [..., H, W, 3] seen in mirror ``name`` (see ``MIRRORS``); also maps mirrored frames back."""
    axes, transpose, _ = _mirror(name)
    out = np.flip(frames, tuple(a - 1 for a in axes)) if axes else frames  # the colour axis is last here
    return np.swapaxes(out, -3, -2) if transpose else out


def mirror_actions(actions, name: str) -> np.ndarray:
    """Action ids int64 [T] that play the mirrored world as ``actions`` play the original."""
    _, _, perm = _mirror(name)
    return np.asarray(perm, np.int64)[action_ids(actions, len(actions))]


def action_ids(actions, n: int) -> np.ndarray:
    """Validate actions (ids or names) and return int64 [n]; raises if there are fewer than n."""
    ids = []
    for a in actions:
        if isinstance(a, str):
            if a not in ACTIONS:
                raise ValueError(f"unknown action {a!r}; choose one of {ACTIONS}")
            a = ACTIONS.index(a)
        a = int(a)
        if not 0 <= a < len(ACTIONS):
            raise ValueError(f"action id {a} is outside 0..{len(ACTIONS) - 1}")
        ids.append(a)
    if len(ids) < n:
        raise ValueError(f"need one action per frame: got {len(ids)} actions for {n} frames")
    return np.asarray(ids[:n], dtype=np.int64)


def random_actions(rng: np.random.Generator, n: int, max_hold: int = 8, p_none: float = 0.2) -> np.ndarray:
    """A random player: each action is held for 1..max_hold frames; int64 [n]."""
    out = np.empty(n, dtype=np.int64)
    i = 0
    while i < n:
        a = 0 if rng.random() < p_none else int(rng.integers(1, len(ACTIONS)))
        k = int(rng.integers(1, max_hold + 1))
        out[i:i + k] = a
        i += k
    return out


def random_prompt(rng: np.random.Generator, theme: str | None = None) -> str:
    """A prompt for training: a theme word (or none, for the default theme) inside filler words."""
    themes = list(THEMES)
    if theme is None:
        theme = themes[int(rng.integers(len(themes)))]
    words = THEME_WORDS[theme]
    # The default theme is also reached by prompts without any theme word.
    if theme == DEFAULT_THEME and rng.random() < 0.3:
        key = None
    else:
        key = words[int(rng.integers(len(words)))]
    n = int(rng.integers(0, 6))
    toks = [FILLER_WORDS[int(rng.integers(len(FILLER_WORDS)))] for _ in range(n)]
    if key is not None:
        toks.insert(int(rng.integers(0, len(toks) + 1)), key)
    return " ".join(toks)


class World:
    """One episode: static scene plus agent and ball state; ``step(action)`` renders the next frame."""

    def __init__(self, seed: int, prompt: str = ""):
        self.seed = int(seed)
        self.theme = theme_of(prompt)
        rng = np.random.default_rng(self.seed)
        self.background = self._scene(rng)
        lo, hi = WALL, SIZE - WALL
        # Agent top-left on the 2-px lattice so that moves of 2 px keep it there and it can touch the wall.
        self.agent = np.array([rng.integers(lo // 2, (hi - AGENT_SIZE) // 2 + 1) * 2,
                               rng.integers(lo // 2, (hi - AGENT_SIZE) // 2 + 1) * 2], dtype=np.int64)
        self.ball = np.array([rng.integers(lo, hi - BALL_DIAMETER + 1),
                              rng.integers(lo, hi - BALL_DIAMETER + 1)], dtype=np.int64)  # top-left x, y
        speeds = np.array([-2, -1, 1, 2])
        self.ball_v = np.array([rng.choice(speeds), rng.choice(speeds)], dtype=np.int64)

    def _scene(self, rng: np.random.Generator) -> np.ndarray:
        pal = THEMES[self.theme]
        img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        checker = ((yy // TILE) + (xx // TILE)) % 2 == 1
        img[:] = pal["floor"]
        img[checker] = pal["tile"]
        for _ in range(int(rng.integers(1, 4))):  # patches: 8..20 px rectangles on the 4-px grid
            w, h = (int(v) * 4 for v in rng.integers(2, 6, size=2))
            x = int(rng.integers(WALL // 4, (SIZE - WALL - w) // 4 + 1)) * 4
            y = int(rng.integers(WALL // 4, (SIZE - WALL - h) // 4 + 1)) * 4
            img[y:y + h, x:x + w] = pal["patch"]
        for _ in range(int(rng.integers(2, 6))):  # items: 4x4 squares on the 4-px grid
            x = int(rng.integers(WALL // 4, (SIZE - WALL) // 4)) * 4
            y = int(rng.integers(WALL // 4, (SIZE - WALL) // 4)) * 4
            img[y:y + 4, x:x + 4] = pal["item"]
        img[:WALL] = img[-WALL:] = pal["wall"]
        img[:, :WALL] = img[:, -WALL:] = pal["wall"]
        return img

    def step(self, action: int) -> tuple[np.ndarray, np.ndarray]:
        """Apply one action and one tick of ball physics; returns (frame uint8 [H, W, 3], agent centre (x, y))."""
        dx, dy = ACTION_DELTAS[int(action)]
        lo, hi = WALL, SIZE - WALL - AGENT_SIZE
        self.agent = np.clip(self.agent + AGENT_SPEED * np.array([dx, dy]), lo, hi)
        self.ball, self.ball_v, _ = _ball_tick(self.ball, self.ball_v)
        return self.render(), self.agent_center()

    def ball_path(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ball's next n positions (top-left, int64 [n, 2]) and whether it bounced on each step (bool [n]),
        without changing the world (the ball does not depend on the actions)."""
        p, v = self.ball.copy(), self.ball_v.copy()
        path, bounced = np.empty((n, 2), dtype=np.int64), np.zeros(n, dtype=bool)
        for t in range(n):
            p, v, bounced[t] = _ball_tick(p, v)
            path[t] = p
        return path, bounced

    def agent_center(self) -> np.ndarray:
        return self.agent.astype(np.float64) + AGENT_SIZE / 2

    def render(self) -> np.ndarray:
        return draw_sprites(self.background, self.agent, self.ball)


def _disc() -> np.ndarray:
    yy, xx = np.mgrid[0:BALL_DIAMETER, 0:BALL_DIAMETER]
    r = BALL_DIAMETER / 2
    return (yy + 0.5 - r) ** 2 + (xx + 0.5 - r) ** 2 <= r * r  # bool [D, D]


_DISC = _disc()


def draw_sprites(background: np.ndarray, agent=None, ball=None) -> np.ndarray:
    """A frame: the static scene uint8 [H, W, 3] with the ball (top-left (x, y), or None) and then the agent
    (top-left, or None) drawn over it, as the world draws them. Returns a new array."""
    img = background.copy()
    if ball is not None:
        bx, by = (int(v) for v in ball)
        view = img[by:by + BALL_DIAMETER, bx:bx + BALL_DIAMETER]
        view[_DISC] = BALL_COLOR
    if agent is not None:
        ax, ay = (int(v) for v in agent)
        img[ay:ay + AGENT_SIZE, ax:ax + AGENT_SIZE] = AGENT_COLOR  # the agent is drawn over the ball
    return img


def _ball_tick(p: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """One tick of ball physics: move, then reflect off the wall (mirror the overshoot so the speed is kept)."""
    blo, bhi = WALL, SIZE - WALL - BALL_DIAMETER
    p, v, bounced = p + v, v.copy(), False
    for i in range(2):
        if p[i] < blo:
            p[i], v[i], bounced = 2 * blo - p[i], -v[i], True
        elif p[i] > bhi:
            p[i], v[i], bounced = 2 * bhi - p[i], -v[i], True
    return p, v, bounced


def simulate(seed: int, actions=None, prompt: str = "", num_frames: int = 64, *, return_background: bool = False):
    """Run an episode.

    actions: one action (id or name) per frame; None draws a random player from the seed.
    Returns frames uint8 [T, 64, 64, 3] and agent centres float64 [T, 2] as (x, y) in pixels; with
    return_background also the static scene uint8 [64, 64, 3].
    """
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if actions is None:
        actions = random_actions(np.random.default_rng([int(seed), 1]), num_frames)
    acts = action_ids(actions, num_frames)
    world = World(seed, prompt)
    frames = np.empty((num_frames, SIZE, SIZE, 3), dtype=np.uint8)
    pos = np.empty((num_frames, 2), dtype=np.float64)
    for t in range(num_frames):
        frames[t], pos[t] = world.step(int(acts[t]))
    if return_background:
        return frames, pos, world.background
    return frames, pos
