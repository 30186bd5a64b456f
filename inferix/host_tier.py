"""Host-memory tier for KV pages: paused sessions move here to make room on the device, and come back on resume.

A preallocated host pool of ``num_pages`` pages (pinned when the device is CUDA) with the device pool's layout:
per layer K and V, lane j of host page h at row h + j * num_pages. A session moves only between engine steps,
when it is paused at a block boundary and none of its pages is shared (forks, kept prefixes). Moving it out frees
its device pages and its reservation; bringing it back takes fresh device pages and rewrites its block table.
"""
from __future__ import annotations

from collections import deque

import torch

from .pages import SessionPages
from .scheduler import PAUSED

__all__ = ["HostTier"]


class HostTier:
    """Host pages of offloaded sessions; the scheduler calls ``make_room``, ``bring_back`` and ``drop``."""

    def __init__(self, engine, num_pages: int):
        self.engine = engine
        self.num_pages = num_pages
        pool = engine.pool
        lanes = engine.kv_lanes
        pin = engine.device.type == "cuda"
        shape = (num_pages * lanes, *pool.k[0].shape[1:])
        self.k = [torch.empty(shape, dtype=t.dtype, pin_memory=pin) for t in pool.k]
        self.v = [torch.empty(shape, dtype=t.dtype, pin_memory=pin) for t in pool.v]
        self.free: deque[int] = deque(range(num_pages))
        # sid -> (its table, its host pages, its K/V staged aside during a swap or None)
        self.held: dict[int, tuple[SessionPages, list, list | None]] = {}
        self.moved_out = 0
        self.moved_in = 0

    # ---- state -------------------------------------------------------------------------------
    @property
    def pages_used(self) -> int:
        return self.num_pages - len(self.free)

    def holds(self, sid: int) -> bool:
        return sid in self.held

    def _rows(self, pages: list[int], stride: int) -> torch.Tensor:
        return torch.tensor([p + j * stride for j in range(self.engine.kv_lanes) for p in pages], dtype=torch.long)

    def movable(self, sid: int, host_free: int | None = None) -> bool:
        """Paused at a block boundary, admitted, not a kept prefix, no shared page, and room on the host."""
        eng = self.engine
        seq = eng.scheduler.seqs.get(sid)
        sp = eng.kv.sessions.get(sid)
        if seq is None or sp is None or seq.status != PAUSED or sid in self.held:
            return False
        if seq.step or seq.block_started or seq.prefill_chunks:
            return False
        if eng.prefixes is not None and sid in eng.prefixes.holders.values():
            return False
        pages = sp.pages()
        room = len(self.free) if host_free is None else host_free
        return not any(eng.kv.shared(p) for p in pages) and len(pages) <= room

    # ---- moves ---------------------------------------------------------------------------------
    def make_room(self, budget: int, incoming: int | None = None) -> bool:
        """Move paused sessions (oldest first) to the host until a reservation of ``budget`` fits the device;
        moves nothing and returns False when it cannot fit that way. incoming: the session being admitted, when
        it is itself on the host; its host pages count as free (they are staged aside first: a swap)."""
        kv = self.engine.kv
        short = kv.reserved + budget - kv.alloc.num_pages
        own = sum(p is not None for p in self.held[incoming][1]) if incoming in self.held else 0
        chosen, host_free = [], len(self.free) + own
        for sid in list(self.engine.scheduler.seqs):
            if short <= 0:
                break
            if sid == incoming or not self.movable(sid, host_free):
                continue
            sp = kv.sessions[sid]
            chosen.append(sid)
            host_free -= len(sp.pages())
            short -= sp.budget
        if short > 0 or not chosen:
            return False
        if own and sum(len(kv.sessions[sid].pages()) for sid in chosen) > len(self.free):
            self._stage(incoming)
        for sid in chosen:
            self.move_out(sid)
        return True

    def _stage(self, sid: int) -> None:
        """Lift a session's K/V off its host pages into a temporary copy, freeing them for a swap."""
        sp, host, _ = self.held[sid]
        src = self._rows(host, self.num_pages)
        staged = [(self.k[layer].index_select(0, src), self.v[layer].index_select(0, src))
                  for layer in range(len(self.k))]
        self.free.extend(host)
        self.held[sid] = (sp, [None] * len(host), staged)

    def move_out(self, sid: int) -> None:
        """Copy the session's K/V to host pages and give its device pages and reservation back."""
        eng = self.engine
        kv = eng.kv
        sp = kv.sessions[sid]
        pages = sp.pages()
        host = [self.free.popleft() for _ in range(len(pages))]
        if pages:
            src = self._rows(pages, kv.alloc.num_pages).to(eng.device)
            dst = self._rows(host, self.num_pages)
            for layer in range(len(eng.pool.k)):
                self.k[layer][dst] = eng.pool.k[layer].index_select(0, src).cpu()
                self.v[layer][dst] = eng.pool.v[layer].index_select(0, src).cpu()
        kv.free(sid)
        self.held[sid] = (sp, host, None)
        self.moved_out += 1

    def bring_back(self, sid: int) -> None:
        """After the session's reservation is taken again: fresh device pages, K/V copied back, table rewritten."""
        eng = self.engine
        kv = eng.kv
        sp, host, staged = self.held.pop(sid)
        new = kv.sessions[sid]
        pages = kv.alloc.allocate(len(host))
        if host:
            cuda = eng.device.type == "cuda"
            src = None if staged else self._rows(host, self.num_pages)
            dst = self._rows(pages, kv.alloc.num_pages).to(eng.device)
            for layer in range(len(eng.pool.k)):
                for i, (hp, dp) in enumerate(((self.k, eng.pool.k), (self.v, eng.pool.v))):
                    t = staged[layer][i] if staged else hp[layer].index_select(0, src)
                    if cuda:
                        t = t.pin_memory()
                    dp[layer].index_copy_(0, dst, t.to(eng.device, non_blocking=cuda))
        it = iter(pages)
        new.sink = [(next(it), f) for _, f in sp.sink]
        new.window = deque((next(it), f) for _, f in sp.window)
        new.frames_committed = sp.frames_committed
        if not staged:
            self.free.extend(host)
        self.moved_in += 1

    def drop(self, sid: int) -> None:
        """The session ended while on the host: its host pages go back."""
        entry = self.held.pop(sid, None)
        if entry is not None and entry[2] is None:
            self.free.extend(entry[1])

    def stats(self) -> dict:
        return {"used": self.pages_used, "total": self.num_pages, "sessions": len(self.held),
                "moved_out": self.moved_out, "moved_in": self.moved_in}
