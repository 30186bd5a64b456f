"""Paged KV bookkeeping: plain Python, no torch.

A page is one latent frame of one session, for every layer at once (layer l keeps its K/V of page p at row p of
its own pool). A session's block table is its pinned sink pages followed by its rolling window of recent pages.
Eviction, sink pinning and fork are edits of these lists plus reference counts; the tensors never move (a
host-memory tier, inferix/host_tier.py, copies a paused session out and back, into fresh pages).

Budget: a session is admitted with a reservation of the most pages it can ever hold at once (its window, or its
whole length when it has no window). The sum of reservations never exceeds the pool, so an admitted session never
fails to find a page. Forked sessions share their parent's pages (reference counted) and reserve their own budget.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["PageAllocator", "KVManager", "SessionPages", "SavedTable", "AdmissionError", "budget_for",
           "check_fits_ever", "kept_frames", "recent_for_block"]


class AdmissionError(RuntimeError):
    """A session can never fit in the page pool (its window alone is larger than the pool)."""


def kept_frames(frames, sink: int, recent: int | None) -> list[int]:
    """The sink+window rule, written once for every copy of a stream's past (the KV block table, the runner's
    latent history): of ``frames`` (absolute latent indices, oldest first) the sink, every frame below ``sink``,
    stays for good, and of the others the latest ``recent`` stay (all of them when recent is None)."""
    frames = list(frames)
    if recent is None:
        return frames
    later = [f for f in frames if f >= sink]
    dropped = set(later[:max(0, len(later) - recent)])
    return [f for f in frames if f not in dropped]


def recent_for_block(window: int | None, sink: int, nframes: int) -> int | None:
    """How many frames past the sink a block of ``nframes`` attends to: a window counts the sink and the block
    itself (None: no window, every frame)."""
    return None if window is None else max(0, window - sink - nframes)


def budget_for(window_frames: int | None, total_frames: int | None) -> int:
    """Pages a session needs at most: its window, or the latent frames it will commit (given exactly, whole blocks
    included) when that is less or when there is no window."""
    if total_frames is None:
        if window_frames is None:
            raise AdmissionError("an unbounded session needs a window (set window_frames)")
        return window_frames
    if window_frames is None:
        return total_frames
    return min(window_frames, total_frames)


def check_fits_ever(budget: int, num_pages: int, window_frames: int | None) -> None:
    """Raises AdmissionError when a reservation of budget pages can never fit a pool of num_pages."""
    if budget > num_pages:
        what = "its window" if window_frames is not None and budget == window_frames else \
            "every latent frame it makes (no window)" if window_frames is None else "every latent frame it makes"
        raise AdmissionError(f"a session needs {budget} KV pages (one per latent frame it keeps: {what}) but the "
                             f"pool has only {num_pages}; raise the pool size (kv_pages)"
                             + (" or lower the window" if window_frames is not None else " or ask for fewer frames"))


class PageAllocator:
    """Free list (FIFO: freed pages are reused last) and reference counts over page ids 0..n-1."""

    def __init__(self, num_pages: int):
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.num_pages = num_pages
        self.free: deque[int] = deque(range(num_pages))
        self.refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self.free)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self.free)

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise RuntimeError(f"cannot allocate {n} pages, {len(self.free)} free")
        pages = [self.free.popleft() for _ in range(n)]
        for p in pages:
            self.refs[p] = 1
        return pages

    def incref(self, pages) -> None:
        for p in pages:
            if self.refs[p] <= 0:
                raise RuntimeError(f"page {p} is not allocated")
            self.refs[p] += 1

    def decref(self, pages) -> None:
        for p in pages:
            if self.refs[p] <= 0:
                raise RuntimeError(f"page {p} freed twice")
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self.free.append(p)


@dataclass
class SessionPages:
    budget: int  # pages reserved for this session
    sink: list = field(default_factory=list)  # [(page, abs_frame)] pinned first frames
    window: deque = field(default_factory=deque)  # [(page, abs_frame)] recent frames, oldest first
    frames_committed: int = 0  # absolute index of the next frame to commit

    def pages(self) -> list[int]:
        return [p for p, _ in self.sink] + [p for p, _ in self.window]

    def frames(self) -> list[int]:
        return [f for _, f in self.sink] + [f for _, f in self.window]


@dataclass
class SavedTable:
    """A session's block table without its pages: the frames it holds (sink, then window, oldest first), the next
    frame it commits and its reservation. What leaves the pool when a session moves to host memory or into a
    snapshot, and what ``KVManager.restore_table`` lays onto fresh pages when it comes back; the field names are
    those of a snapshot header's ``pages`` entry."""
    budget: int
    sink_frames: list
    window_frames: list
    frames_committed: int

    def frames(self) -> list[int]:
        return list(self.sink_frames) + list(self.window_frames)


class KVManager:
    """Block tables of all sessions over one page pool.

    sink_frames: first frames of a video kept for good. window_frames: frames a block attends to, counting the
    sink and the block itself (None: no limit, the session holds all its frames).
    """

    def __init__(self, num_pages: int, block_frames: int, window_frames: int | None = None, sink_frames: int = 0):
        if block_frames <= 0:
            raise ValueError(f"block_frames must be positive, got {block_frames}")
        if sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {sink_frames}")
        if window_frames is not None and window_frames < sink_frames + block_frames:
            raise ValueError(f"window ({window_frames} frames) must hold the sink ({sink_frames}) plus one block "
                             f"({block_frames})")
        self.alloc = PageAllocator(num_pages)
        self.block_frames = block_frames
        self.window_frames = window_frames
        self.sink_frames = sink_frames
        self.sessions: dict[int, SessionPages] = {}
        self.reserved = 0

    # ---- admission ------------------------------------------------------------------------
    def budget_for(self, total_frames: int | None) -> int:
        """Pages a session needs at most: its window, or the latent frames it will commit (given exactly, whole
        blocks included) when that is less or when there is no window."""
        return budget_for(self.window_frames, total_frames)

    def can_allocate(self, budget: int) -> bool:
        """No side effects: would a session with this budget fit now?"""
        return self.reserved + budget <= self.alloc.num_pages

    def check_fits_ever(self, budget: int) -> None:
        check_fits_ever(budget, self.alloc.num_pages, self.window_frames)

    def allocate(self, sid: int, budget: int) -> None:
        if sid in self.sessions:
            raise KeyError(f"session {sid} already holds pages")
        if not self.can_allocate(budget):
            raise RuntimeError(f"session {sid} does not fit: {budget} pages asked, "
                               f"{self.alloc.num_pages - self.reserved} unreserved")
        self.sessions[sid] = SessionPages(budget=budget)
        self.reserved += budget

    # ---- per block --------------------------------------------------------------------------
    def begin_block(self, sid: int, nframes: int | None = None) -> list[int]:
        """Evict what the next block (of nframes, default block_frames) will not see; returns the pages evicted
        (freed unless a fork still shares them)."""
        sp = self.sessions[sid]
        if self.window_frames is None:
            return []
        recent = recent_for_block(self.window_frames, self.sink_frames, nframes or self.block_frames)
        keep = set(kept_frames(sp.frames(), self.sink_frames, recent))
        evicted = []
        while sp.window and sp.window[0][1] not in keep:  # the window is oldest first: what goes is its front
            p, _ = sp.window.popleft()
            evicted.append(p)
        self.alloc.decref(evicted)
        return evicted

    def context(self, sid: int) -> tuple[list[int], list[int]]:
        """(pages, absolute frame indices) the current block attends to, in order: sink then window."""
        sp = self.sessions[sid]
        return sp.pages(), sp.frames()

    def commit(self, sid: int, nframes: int) -> list[int]:
        """Allocate pages for nframes freshly committed frames (written by the commit pass); returns them."""
        sp = self.sessions[sid]
        held = len(sp.sink) + len(sp.window)
        if held + nframes > sp.budget:
            raise RuntimeError(f"session {sid} would hold {held + nframes} pages, over its budget {sp.budget} "
                               f"(begin_block evicts first)")
        pages = self.alloc.allocate(nframes)
        for p in pages:
            f = sp.frames_committed
            if f < self.sink_frames:
                sp.sink.append((p, f))
            else:
                sp.window.append((p, f))
            sp.frames_committed += 1
        return pages

    def replace(self, sid: int, old: int, new: int) -> None:
        """Swap one page of a session's table (copy-on-write of a shared page)."""
        sp = self.sessions[sid]
        for lst in (sp.sink, sp.window):
            for i, (p, f) in enumerate(lst):
                if p == old:
                    lst[i] = (new, f)
                    self.alloc.decref([old])
                    return
        raise KeyError(f"page {old} is not in session {sid}'s table")

    def shared(self, page: int) -> bool:
        return self.alloc.refs[page] > 1

    def copy_on_write(self, sid: int, pages: list[int]) -> list[int] | None:
        """The pages a pass may overwrite in place of ``pages`` (sid's table, in order): shared pages (forks) are
        swapped for fresh ones first. None, and nothing changed, when the session's budget or the free pages
        cannot take the copies."""
        shared = [p for p in pages if self.shared(p)]
        sp = self.sessions[sid]
        if len(sp.pages()) + len(shared) > sp.budget or not self.alloc.can_allocate(len(shared)):
            return None
        fresh = dict(zip(shared, self.alloc.allocate(len(shared))))
        for old, new in fresh.items():
            self.replace(sid, old, new)
        return [fresh.get(p, p) for p in pages]

    # ---- queries ------------------------------------------------------------------------------
    def holds(self, sid: int) -> bool:
        """Whether sid has a reservation (and a block table) in this pool."""
        return sid in self.sessions

    def held_pages(self, sid: int) -> list[int]:
        """Pages in sid's table now: sink, then window, oldest first."""
        return self.sessions[sid].pages()

    def frames_committed(self, sid: int) -> int:
        """Absolute latent index of the next frame sid commits (all frames before it are committed)."""
        return self.sessions[sid].frames_committed

    def budget_of(self, sid: int) -> int:
        return self.sessions[sid].budget

    def block_table(self, sid: int) -> list[tuple[int, int]]:
        """sid's table as (absolute frame, page) pairs: sink, then window, oldest first."""
        sp = self.sessions[sid]
        return list(zip(sp.frames(), sp.pages()))

    # ---- tables that leave the pool and come back (host memory, snapshots) ----------------------
    def save_table(self, sid: int) -> SavedTable:
        """sid's table without its pages (nothing changes)."""
        sp = self.sessions[sid]
        return SavedTable(budget=sp.budget, sink_frames=[f for _, f in sp.sink],
                          window_frames=[f for _, f in sp.window], frames_committed=sp.frames_committed)

    def take_table(self, sid: int) -> SavedTable:
        """sid's table, after which sid leaves the pool: its pages and its reservation go back. The caller has
        copied the pages' contents out first (``held_pages`` names them)."""
        table = self.save_table(sid)
        self.free(sid)
        return table

    def restore_table(self, sid: int, table: SavedTable) -> list[int]:
        """Lay a saved table onto fresh pages of sid, which holds a reservation and no page yet; returns the
        pages in table order (sink, then window), for the caller to copy the contents into."""
        sp = self.sessions[sid]
        frames = table.frames()
        if sp.sink or sp.window:
            raise RuntimeError(f"session {sid} already holds pages; a saved table goes onto an empty one")
        if len(frames) > sp.budget:
            raise RuntimeError(f"a table of {len(frames)} pages does not fit session {sid}'s budget {sp.budget}")
        pages = self.alloc.allocate(len(frames))
        n_sink = len(table.sink_frames)
        sp.sink = [(p, int(f)) for p, f in zip(pages[:n_sink], frames[:n_sink])]
        sp.window = deque((p, int(f)) for p, f in zip(pages[n_sink:], frames[n_sink:]))
        sp.frames_committed = int(table.frames_committed)
        return pages

    # ---- lifecycle ----------------------------------------------------------------------------
    def fork(self, src: int, dst: int) -> None:
        """dst starts with src's table; pages are shared (committed pages are never written again)."""
        s = self.sessions[src]
        self.allocate(dst, s.budget)
        d = self.sessions[dst]
        d.sink, d.window, d.frames_committed = list(s.sink), deque(s.window), s.frames_committed
        self.alloc.incref(d.pages())

    def share(self, src: int, dst: int, budget: int, release_src: bool = False) -> None:
        """dst (a new reservation of budget pages) starts from src's table, its pages shared. release_src: src
        hands its pages over and its own reservation is freed first."""
        s = self.sessions[src]
        held = s.pages()
        if len(held) > budget:
            raise RuntimeError(f"session {dst} reserves {budget} pages, fewer than the {len(held)} it would share")
        if not self.can_allocate(budget - (s.budget if release_src else 0)):
            raise RuntimeError(f"no KV budget left to share session {src}'s pages ({budget} pages needed)")
        self.alloc.incref(held)  # dst's references, taken before src may go
        if release_src:
            self.free(src)
        self.allocate(dst, budget)
        d = self.sessions[dst]
        d.sink, d.window, d.frames_committed = list(s.sink), deque(s.window), s.frames_committed

    def free(self, sid: int) -> None:
        sp = self.sessions.pop(sid, None)
        if sp is None:
            return
        self.alloc.decref(sp.pages())
        self.reserved -= sp.budget

    @property
    def num_pages(self) -> int:
        return self.alloc.num_pages

    @property
    def unreserved(self) -> int:
        """Pages no session has reserved: what a new session's budget must fit in."""
        return self.alloc.num_pages - self.reserved

    @property
    def pages_in_use(self) -> int:
        return self.alloc.num_pages - self.alloc.num_free

    @property
    def free_pages(self) -> int:
        """Pages no table holds now (reserved or not)."""
        return self.alloc.num_free
