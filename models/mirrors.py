"""Mirror images of a mirror-symmetric world (the toy world's arena is one): which image axes flip and which
actions swap. The engine's mirror views and the toy world's simulator and standalone rollout all read this table.
"""
from __future__ import annotations

__all__ = ["MIRRORS", "check_mirrors", "action_permutation"]

# name -> (image axes flipped, counted from the end: -1 is x, -2 is y; the pairs of action names that swap)
MIRRORS = {"h": ((-1,), (("left", "right"),)), "v": ((-2,), (("up", "down"),)),
           "hv": ((-2, -1), (("left", "right"), ("up", "down")))}


def check_mirrors(mirrors) -> tuple:
    """The names as a tuple; a ValueError unless they are distinct names from ``MIRRORS``."""
    mirrors = tuple(mirrors)
    if any(m not in MIRRORS for m in mirrors) or len(set(mirrors)) != len(mirrors):
        raise ValueError(f"mirrors must be distinct names from {sorted(MIRRORS)}, got {list(mirrors)}")
    return mirrors


def action_permutation(name: str, action_names, model: str = "the model") -> list[int]:
    """The action id each action id becomes in mirror ``name``, for a model with these action names."""
    names = list(action_names)
    swaps = MIRRORS[check_mirrors([name])[0]][1]
    missing = [a for pair in swaps for a in pair if a not in names]
    if missing:
        raise ValueError(f"mirror {name!r} swaps actions {missing} that {model} does not have ({names})")
    perm = list(range(len(names)))
    for a, b in swaps:
        perm[names.index(a)], perm[names.index(b)] = names.index(b), names.index(a)
    return perm
