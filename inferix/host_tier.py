"""Host-memory tier for KV pages: paused sessions move here to make room on the device, and come back on resume.

A preallocated host pool of ``num_pages`` pages (pinned when the device is CUDA) with the device pool's layout:
one host tensor per per-page tensor of the device pool (``KVPool.page_tensors``: per layer K and V, and every
cache group a model keeps beside them), lane j of host page h at row h + j * num_pages, so whatever a page holds
moves with it. A session moves only between engine steps, when it is paused at a block boundary and none of its
pages is shared (forks, kept prefixes). Moving it out frees its device pages and its reservation; bringing it back
takes fresh device pages and lays its saved block table onto them (``KVManager.take_table`` / ``restore_table``).
"""
from __future__ import annotations

from collections import deque

import torch

from .pages import SavedTable
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
        # name -> host copy of that device tensor (``KVPool.page_tensors`` names), num_pages rows per lane
        self.tensors = {name: torch.empty((num_pages * lanes, *t.shape[1:]), dtype=t.dtype, pin_memory=pin)
                        for name, t in pool.page_tensors()}
        self.free: deque[int] = deque(range(num_pages))
        # sid -> (its table, its host pages, its page tensors staged aside during a swap or None)
        self.held: dict[int, tuple[SavedTable, list, dict | None]] = {}
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
        if seq is None or not eng.kv.holds(sid) or seq.status != PAUSED or sid in self.held:
            return False
        if seq.step or seq.block_started or seq.prefill_chunks:
            return False
        if eng.prefixes is not None and sid in eng.prefixes.holders.values():
            return False
        pages = eng.kv.held_pages(sid)
        room = len(self.free) if host_free is None else host_free
        return not any(eng.kv.shared(p) for p in pages) and len(pages) <= room

    # ---- moves ---------------------------------------------------------------------------------
    def make_room(self, budget: int, incoming: int | None = None) -> bool:
        """Move paused sessions (oldest first) to the host until a reservation of ``budget`` fits the device;
        moves nothing and returns False when it cannot fit that way. incoming: the session being admitted, when
        it is itself on the host; its host pages count as free (they are staged aside first: a swap)."""
        kv = self.engine.kv
        short = budget - kv.unreserved
        own = sum(p is not None for p in self.held[incoming][1]) if incoming in self.held else 0
        chosen, host_free = [], len(self.free) + own
        for sid in list(self.engine.scheduler.seqs):
            if short <= 0:
                break
            if sid == incoming or not self.movable(sid, host_free):
                continue
            chosen.append(sid)
            host_free -= len(kv.held_pages(sid))
            short -= kv.budget_of(sid)
        if short > 0 or not chosen:
            return False
        if own and sum(len(kv.held_pages(sid)) for sid in chosen) > len(self.free):
            self._stage(incoming)
        for sid in chosen:
            self.move_out(sid)
        return True

    def _stage(self, sid: int) -> None:
        """Lift a session's page contents off its host pages into a temporary copy, freeing them for a swap."""
        table, host, _ = self.held[sid]
        src = self._rows(host, self.num_pages)
        staged = {name: t.index_select(0, src) for name, t in self.tensors.items()}
        self.free.extend(host)
        self.held[sid] = (table, [None] * len(host), staged)

    def move_out(self, sid: int) -> None:
        """Copy the session's pages (K/V and cache groups) to host pages and give its device pages and
        reservation back."""
        eng = self.engine
        kv = eng.kv
        pages = kv.held_pages(sid)
        host = [self.free.popleft() for _ in range(len(pages))]
        if pages:
            src = self._rows(pages, kv.num_pages).to(eng.device)
            dst = self._rows(host, self.num_pages)
            for name, t in eng.pool.page_tensors():
                self.tensors[name][dst] = t.index_select(0, src).cpu()
        self.held[sid] = (kv.take_table(sid), host, None)
        self.moved_out += 1

    def bring_back(self, sid: int) -> None:
        """After the session's reservation is taken again: fresh device pages, their contents copied back, table
        rewritten."""
        eng = self.engine
        kv = eng.kv
        table, host, staged = self.held.pop(sid)
        pages = kv.restore_table(sid, table)
        if host:
            cuda = eng.device.type == "cuda"
            src = None if staged else self._rows(host, self.num_pages)
            dst = self._rows(pages, kv.num_pages).to(eng.device)
            for name, dev in eng.pool.page_tensors():
                t = staged[name] if staged else self.tensors[name].index_select(0, src)
                if cuda:
                    t = t.pin_memory()
                dev.index_copy_(0, dst, t.to(eng.device, non_blocking=cuda))
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
