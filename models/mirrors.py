"""Mirror images of a symmetric world (the toy world's square arena is one): which image axes flip, whether the
image is transposed, and which actions swap. The engine's mirror views and the toy world's simulator and standalone
rollout all read this table.

Every entry is a reflection of the square (or the half turn "hv"), so applying it twice gives the image back: the
same operation maps a view into the mirror and back. Flips come first, then the transpose; in every entry the two
commute.
"""
from __future__ import annotations

__all__ = ["MIRRORS", "check_mirrors", "parse_mirrors", "action_permutation", "mirror_tensor", "needs_square"]

# name -> (image axes flipped, counted from the end: -1 is x, -2 is y; whether x and y then swap (a transpose);
#          the pairs of action names that swap)
MIRRORS = {
    "h": ((-1,), False, (("left", "right"),)),  # left-right mirror
    "v": ((-2,), False, (("up", "down"),)),  # top-bottom mirror
    "hv": ((-2, -1), False, (("left", "right"), ("up", "down"))),  # half turn
    "d": ((), True, (("up", "left"), ("down", "right"))),  # mirror in the main diagonal (a transpose)
    "a": ((-2, -1), True, (("up", "right"), ("down", "left"))),  # mirror in the anti-diagonal
}


def check_mirrors(mirrors) -> tuple:
    """The names as a tuple; a ValueError unless they are distinct names from ``MIRRORS``."""
    mirrors = tuple(mirrors)
    if any(m not in MIRRORS for m in mirrors) or len(set(mirrors)) != len(mirrors):
        raise ValueError(f"mirrors must be distinct names from {sorted(MIRRORS)}, got {list(mirrors)}")
    return mirrors


def parse_mirrors(text: str | None) -> tuple:
    """A command line's 'hv,d,a' -> ('hv', 'd', 'a'), checked as ``check_mirrors`` does; '' or None -> ()."""
    return check_mirrors(m.strip() for m in (text or "").split(",") if m.strip())


def needs_square(mirrors) -> list:
    """The names among ``mirrors`` that transpose the image (they need height == width)."""
    return [m for m in check_mirrors(mirrors) if MIRRORS[m][1]]


def mirror_tensor(x, name: str):
    """``x`` (a torch tensor whose last two axes are y, x) seen in mirror ``name``; also maps a view back."""
    axes, transpose, _ = MIRRORS[name]
    if axes:
        x = x.flip(axes)
    return x.transpose(-1, -2) if transpose else x


def action_permutation(name: str, action_names, model: str = "the model") -> list[int]:
    """The action id each action id becomes in mirror ``name``, for a model with these action names."""
    names = list(action_names)
    swaps = MIRRORS[check_mirrors([name])[0]][2]
    missing = [a for pair in swaps for a in pair if a not in names]
    if missing:
        raise ValueError(f"mirror {name!r} swaps actions {missing} that {model} does not have ({names})")
    perm = list(range(len(names)))
    for a, b in swaps:
        perm[names.index(a)], perm[names.index(b)] = names.index(b), names.index(a)
    return perm
