"""Shared start prefixes: sessions that start from the same frames and prompt run the prefill once.

When a session's given frames are all committed (right before its first generated block) the engine keeps a
paused, hidden fork of it, the prefix holder. A later session with the same key starts as a fork of the holder:
its pages are shared copy-on-write, its noise, counters and plans are its own. See docs/snapshots.md.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

__all__ = ["PrefixCache", "prefix_key", "NoNoise"]


def prefix_key(init_latents: torch.Tensor, prompt: str, text_embeds: torch.Tensor | None) -> tuple:
    """What a prefill depends on: the given latents (as encoded), the start prompt, explicit text embeddings (by
    identity: the holder keeps the tensor alive, so the id is not reused while the prefix is kept)."""
    lat = init_latents.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(f"{list(lat.shape)}".encode())
    h.update(lat.numpy().tobytes())
    return h.hexdigest(), prompt, None if text_embeds is None else id(text_embeds), int(lat.shape[1])


class NoNoise:
    """The noise of a prefix holder: it never denoises (a session forked from it brings its own noise)."""

    def clone(self) -> "NoNoise":
        return self

    def initial(self, block, start, shape):
        raise RuntimeError("a prefix holder makes no blocks")

    renoise = initial


class PrefixCache:
    """Kept prefixes (key -> holder sid, least recently used first) and the sessions that may become one."""

    def __init__(self, max_prefixes: int):
        self.max_prefixes = max_prefixes
        self.holders: OrderedDict = OrderedDict()
        self.sources: dict[int, tuple] = {}  # sid -> key: its prefill, once done, is kept
        self.hits = self.misses = self.evicted = 0

    def get(self, key) -> int | None:
        sid = self.holders.get(key)
        if sid is not None:
            self.holders.move_to_end(key)
        return sid

    def lru(self, keep=None):
        """(key, sid) of the least recently used holder other than keep's, or None."""
        return next(((k, s) for k, s in self.holders.items() if k != keep), None)

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "holders": len(self.holders), "evicted": self.evicted,
                "max_prefixes": self.max_prefixes}
