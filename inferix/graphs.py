"""Whole-pass CUDA graphs for steady-state DiT passes (``Engine(cuda_graphs=True)``, ``--cuda-graphs``).

A stream in steady state repeats the same passes: the same batch, block size and context length (the window is
full), only the values change (latents, timesteps, the page ids of the rolled window, the text K/V of the rows).
Such a pass is captured once into a CUDA graph whose inputs live in static buffers; later passes with the same
shape copy their inputs into those buffers in place (block tables, context lengths, write pages, RoPE tables,
latents, timesteps, actions, text K/V) and replay the graph, which removes the launch overhead of a few hundred
small kernels per pass. Passes whose shape has not repeated ``warmup`` times run eagerly, so a growing context
(the first blocks of a stream, or global attention) never captures.

On the CPU there is nothing to capture: ``emulate=True`` runs every pass through the same static buffers with no
graph, which checks the in-place plumbing against the plain path (tests/test_graphs.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from inferix.kernels.attention import PagedMeta
from inferix.models.wan_dit import TextKV

__all__ = ["PassGraphs"]


def _flat(x, t, ctx: TextKV, qpos, meta: PagedMeta, actions, rope) -> list:
    """The pass's tensor inputs in a fixed order (None where absent)."""
    return [x, t, qpos, rope[0], rope[1], meta.block_tables, meta.context_pages, meta.write_pages,
            meta.cache_cos, meta.cache_sin, actions] + [a for kv in ctx.kv for a in kv]


@dataclass
class _Captured:
    inputs: list  # static buffers, in _flat order
    meta: PagedMeta  # built on the static buffers
    ctx: TextKV
    graph: object = None  # torch.cuda.CUDAGraph, or None when emulated
    out: torch.Tensor | None = None  # the static output of the captured pass


class PassGraphs:
    def __init__(self, dit, device, *, warmup: int = 2, emulate: bool = False, max_graphs: int = 16):
        self.dit = dit
        self.device = torch.device(device)
        if self.device.type != "cuda" and not emulate:
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device} (emulate=True checks the static "
                             "buffers on the CPU)")
        self.warmup = warmup
        self.emulate = emulate
        self.max_graphs = max_graphs
        self.seen: dict = {}
        self.graphs: dict = {}
        self.replays = 0
        self.captures = 0

    @staticmethod
    def key(x, meta: PagedMeta, actions, kv_only: bool, negative: bool) -> tuple:
        """Everything that fixes a pass's kernels: shapes, each row's context length, which inputs exist."""
        return (tuple(x.shape), tuple(meta.block_tables.shape), tuple(meta.context_pages_list),
                None if meta.write_pages is None else tuple(meta.write_pages.shape),
                meta.cache_cos is None, actions is None, kv_only, negative)

    def __call__(self, forward, x, t, ctx: TextKV, qpos, meta: PagedMeta, actions, rope, *, kv_only: bool,
                 negative: bool = False, steady: bool = True):
        """forward(x, t, ctx, qpos, meta, actions, rope) -> prediction or None; run eagerly, captured or
        replayed. steady: every row's window is full (a pass that will repeat); others always run eagerly."""
        if not steady:
            return forward(x, t, ctx, qpos, meta, actions, rope)
        k = self.key(x, meta, actions, kv_only, negative)
        cap = self.graphs.get(k)
        if cap is None:
            self.seen[k] = self.seen.get(k, 0) + 1
            if self.seen[k] <= self.warmup or len(self.graphs) >= self.max_graphs:
                return forward(x, t, ctx, qpos, meta, actions, rope)
            cap = self._capture(forward, k, x, t, ctx, qpos, meta, actions, rope)
            return None if cap.out is None else cap.out.clone()
        self._fill(cap, x, t, ctx, qpos, meta, actions, rope)
        if cap.graph is None:  # emulated: the same buffers, no graph
            out = forward(*self._args(cap))
        else:
            cap.graph.replay()
            out = cap.out
        self.replays += 1
        return None if out is None else out.clone()

    # ---- static buffers -------------------------------------------------------------------------------------
    @staticmethod
    def _args(cap: _Captured) -> tuple:
        x, t, qpos, cos, sin = cap.inputs[:5]
        actions = cap.inputs[10]
        return x, t, cap.ctx, qpos, cap.meta, actions, (cos, sin)

    @staticmethod
    def _fill(cap: _Captured, *args) -> None:
        for dst, src in zip(cap.inputs, _flat(*args)):
            if dst is not None:
                dst.copy_(src, non_blocking=True)
        cap.meta._rotation = None  # derived from cache_cos/sin: rebuilt from the new values (inside the graph)

    def _capture(self, forward, k, x, t, ctx, qpos, meta, actions, rope) -> _Captured:
        inputs = [None if a is None else a.clone() for a in _flat(x, t, ctx, qpos, meta, actions, rope)]
        smeta = PagedMeta(pool=meta.pool, block_tables=inputs[5], context_pages=inputs[6], write_pages=inputs[7],
                          cache_cos=inputs[8], cache_sin=inputs[9],
                          context_pages_list=list(meta.context_pages_list))
        kvs = inputs[11:]
        cap = _Captured(inputs=inputs, meta=smeta, ctx=TextKV([(kvs[i], kvs[i + 1]) for i in range(0, len(kvs), 2)]))
        if self.emulate:
            cap.out = forward(*self._args(cap))
        else:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # kernels pick their algorithms outside the capture
                forward(*self._args(cap))
            torch.cuda.current_stream(self.device).wait_stream(side)
            cap.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cap.graph):
                cap.out = forward(*self._args(cap))
            cap.graph.replay()  # the capture recorded the pass; the replay computes it
        self.graphs[k] = cap
        self.captures += 1
        return cap
