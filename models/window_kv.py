"""A dense K/V cache of committed frames, trimmed like the engine's paged cache (sink + most recent frames).

The engine-free toy-world rollout (models/toyworld/eval.py, a test oracle for the engine) keeps its context here; it
trims by its own code, written apart from the engine's, so that the two check each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.attention import SDPABackend
from ..kernels.rope import apply_rope

__all__ = ["RolloutMeta", "WindowKVBackend"]


@dataclass
class RolloutMeta:
    commit: bool  # True: this pass's K/V are appended to the cache after attending


class WindowKVBackend(SDPABackend):
    """Dense per-layer K/V lists of the committed frames, trimmed like the engine's cache: the first ``sink``
    frames for good, then the most recent ones, so that a block attends to at most ``window`` frames counting
    the sink and the block itself.

    ``rope``: for cache-relative positions (a bundle's ``positions: "relative"``), a callable ``rope(n)`` giving
    cos/sin for cache positions 0..n-1. Keys are then stored before RoPE and rotated when read, the cached frames
    at 0..n-1 in cache order, as the engine's paged cache does; the block being run must use positions n, n+1, ...
    Without it, keys are stored rotated at whatever positions their pass used (absolute positions)."""
    name = "window-kv"

    def __init__(self, num_layers: int, frame_tokens: int, window: int, sink: int, block_frames: int, rope=None):
        if window < sink + block_frames:
            raise ValueError(f"window {window} must hold the sink ({sink}) plus one block ({block_frames})")
        self.k: list = [None] * num_layers
        self.v: list = [None] * num_layers
        self.T, self.sink = frame_tokens, sink
        self.keep = window - block_frames - sink
        self.rope = rope
        self._rot: dict = {}  # n cached frames -> (cos, sin)

    def frames_cached(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[1] // self.T

    def nbytes(self) -> int:
        """Bytes the cached K and V hold, every layer and batch row."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def _cached_keys(self, layer: int):
        kc = self.k[layer]
        if kc is None or self.rope is None:
            return kc
        n = kc.shape[1] // self.T
        if n not in self._rot:
            self._rot[n] = self.rope(n)
        cos, sin = self._rot[n]  # [1, L, D/2]: the same cache positions for every batch row
        return apply_rope(kc, cos.expand(kc.shape[0], -1, -1), sin.expand(kc.shape[0], -1, -1))

    def attend(self, q, k, v, layer, meta, k_raw=None):
        if not isinstance(meta, RolloutMeta):
            return super().attend(q, k, v, layer, meta, k_raw=k_raw)
        kc, vc = self._cached_keys(layer), self.v[layer]
        kk = k if kc is None else torch.cat([kc, k], 1)  # [B, (cached + own) tokens, H, D]
        vv = v if vc is None else torch.cat([vc, v], 1)
        out = self.masked(q, kk, vv, None)
        if meta.commit:
            self._append(layer, k if self.rope is None else k_raw, vv)
        return out

    def write_kv(self, k, v, layer, meta, k_raw=None):
        if not isinstance(meta, RolloutMeta):
            return super().write_kv(k, v, layer, meta, k_raw=k_raw)
        if not meta.commit:
            raise ValueError("write_kv needs RolloutMeta(commit=True)")
        vv = v if self.v[layer] is None else torch.cat([self.v[layer], v], 1)
        self._append(layer, k if self.rope is None else k_raw, vv)

    def _append(self, layer, new_k, vv):
        """Append a committed block's keys (vv: the values, cached and new, already joined), then trim."""
        ks = new_k if self.k[layer] is None else torch.cat([self.k[layer], new_k], 1)
        s, n = self.sink * self.T, self.keep * self.T
        if ks.shape[1] > s + n:  # drop the oldest frames after the sink
            ks = torch.cat([ks[:, :s], ks[:, ks.shape[1] - n:]], 1)
            vv = torch.cat([vv[:, :s], vv[:, vv.shape[1] - n:]], 1)
        self.k[layer], self.v[layer] = ks, vv
