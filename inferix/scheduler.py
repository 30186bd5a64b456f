"""Semi-autoregressive block scheduler: plain ints and lists, no torch.

Each session carries counters, not phases: which block it is on, which denoising step, how many context frames
remain to prefill. ``schedule()`` turns them into a StepPlan; ``update()`` advances them after the runner ran it.
Admission goes through the KV manager's side-effect-free ``can_allocate`` before ``allocate``.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

from .pages import KVManager
from .plan import COMMIT, DENOISE, PREFILL, RECACHE, Group, Row, StepPlan

__all__ = ["Scheduler", "SeqState", "WAITING", "RUNNING", "PAUSED", "FINISHED", "CANCELLED", "FAILED"]

WAITING, RUNNING, PAUSED, FINISHED, CANCELLED, FAILED = "waiting", "running", "paused", "finished", "cancelled", "failed"


@dataclass
class SeqState:
    sid: int
    prompt: str
    total_blocks: int | None  # None: runs until cancelled (needs a window)
    budget: int
    status: str = WAITING
    block: int = 0
    step: int = 0
    prefill_chunks: list = field(default_factory=list)  # sizes of the prefill passes still to run
    pending_prompt: str | None = None
    recache_on_switch: bool = False
    need_recache: bool = False
    action: object = 0  # held per-latent-frame condition (world models: an action id, keyboard and mouse values)
    pending_action: object = None  # set by Session.act, applied at the next block boundary
    action_plan: dict = field(default_factory=dict)  # absolute latent frame -> action id
    prompt_plan: dict = field(default_factory=dict)  # block index -> prompt
    block_started: bool = False
    frame_start: int = 0  # absolute latent index of the current block's first frame
    block_actions: list | None = None
    action_history: list = field(default_factory=list)  # conditions of the latest latent frames (incl. this block)
    first_block_frames: int = 0  # >0: the first generated block has this many frames (independent first frame)
    n_init: int = 0  # given context frames (prefilled before the first generated block)
    block_nframes: int = 0  # frames of the current block
    prompt_changed: bool = False  # the block that starts next carries a new prompt to the runner


class Scheduler:
    def __init__(self, kv: KVManager, num_steps: int, block_frames: int, max_batch: int = 8, history: int = 0):
        self.kv = kv
        self.history = history  # latent frames before a block whose conditions its rows carry (past_actions)
        self.num_steps = num_steps
        self.block_frames = block_frames
        self.max_batch = max_batch
        self.seqs: dict[int, SeqState] = {}
        self.queue: list[int] = []  # waiting sids, FIFO
        self.reclaim = None  # callable() -> bool: frees a reservation nobody runs on (a kept prefix) when one waits
        self.host = None  # host tier (make_room / bring_back / holds / drop): paused sessions moved off the device

    # ---- sessions ------------------------------------------------------------------------------
    def add(self, seq: SeqState) -> None:
        self.kv.check_fits_ever(seq.budget)
        self.seqs[seq.sid] = seq
        seq.status = WAITING
        self.queue.append(seq.sid)
        self._admit()

    def make_room(self, budget: int, incoming: int | None = None) -> bool:
        """Whether a reservation of ``budget`` fits now, after freeing what may be freed for it: kept prefixes,
        then paused sessions moved to host memory (incoming: the session being admitted, if it is on the host)."""
        while not self.kv.can_allocate(budget):
            if self.reclaim is not None and self.reclaim():
                continue
            if self.host is not None and self.host.make_room(budget, incoming):
                continue
            return False
        return True

    def _admit(self) -> None:
        while self.queue:
            seq = self.seqs[self.queue[0]]
            if not self.make_room(seq.budget, seq.sid):
                break
            self.queue.pop(0)
            self.kv.allocate(seq.sid, seq.budget)
            if self.host is not None and self.host.holds(seq.sid):
                self.host.bring_back(seq.sid)
            if seq.status == WAITING:
                seq.status = RUNNING

    def requeue(self, sid: int) -> None:
        """A resumed session whose pages are on the host waits for a reservation like a new session."""
        seq = self.seqs[sid]
        seq.status = WAITING
        self.queue.append(sid)
        self._admit()

    def unqueue(self, sid: int) -> None:
        """Paused again before it got its pages back: it leaves the queue and stays on the host."""
        if sid in self.queue:
            self.queue.remove(sid)
        self.seqs[sid].status = PAUSED

    def waiting_position(self, sid: int) -> int | None:
        return self.queue.index(sid) if sid in self.queue else None

    def release(self, sid: int, status: str, admit: bool = True) -> None:
        """Finish, cancel or fail: pages are freed at once and (admit) waiting sessions may be admitted."""
        seq = self.seqs.pop(sid, None)  # ended sessions leave the scheduler; their handles keep the state
        if seq is None:
            return
        seq.status = status
        if sid in self.queue:
            self.queue.remove(sid)
        self.kv.free(sid)
        if self.host is not None:
            self.host.drop(sid)
        if admit:
            self._admit()

    def fork(self, src: int, dst_sid: int) -> SeqState:
        """A paused session dst_sid that shares src's pages (copy-on-write) and continues from src's counters."""
        s = self.seqs.get(src)
        if s is None:
            raise RuntimeError(f"session {src} has ended; only a running or paused session can be forked")
        if s.status not in (RUNNING, PAUSED):
            raise RuntimeError(f"session {src} is {s.status}; only a running or paused session can be forked")
        if self.host is not None and self.host.holds(src):
            raise RuntimeError(f"session {src} is in host memory; resume it (and let it run) before forking it")
        if not self.kv.can_allocate(s.budget):
            raise RuntimeError(f"no KV budget left to fork session {src} ({s.budget} pages needed)")
        self.kv.fork(src, dst_sid)
        # every counter and plan carries over (replace cannot forget a field); the mutable ones are copied
        dst = replace(s, sid=dst_sid, status=PAUSED, prefill_chunks=list(s.prefill_chunks),
                      action_plan=dict(s.action_plan), prompt_plan=dict(s.prompt_plan),
                      block_actions=None if s.block_actions is None else list(s.block_actions))
        self.seqs[dst_sid] = dst
        return dst

    def share(self, src: int, dst_seq: SeqState, take: bool = False) -> None:
        """dst (a new session with its own counters and budget) starts from src's committed pages, shared
        copy-on-write, and runs at once. take: src ends here and hands its pages over (its reservation goes first)."""
        if not self.kv.holds(src) or src not in self.seqs:
            raise RuntimeError(f"session {src} has ended; it has no pages to share")
        self.kv.share(src, dst_seq.sid, dst_seq.budget, release_src=take)
        if take:
            self.release(src, CANCELLED, admit=False)  # its pages are dst's now; the rest of it ends here
        dst_seq.status = RUNNING
        self.seqs[dst_seq.sid] = dst_seq

    # ---- planning ------------------------------------------------------------------------------
    # A session's next row, by what it still has to do: prefill its given frames, then per block: start it
    # (prompt switch, eviction, actions), recache the window under a new prompt, denoise, commit.
    def _row(self, seq: SeqState) -> Row:
        if seq.prefill_chunks:
            return self._prefill_row(seq)
        if not seq.block_started:
            self._start_block(seq)
        pages, frames = self.kv.context(seq.sid)
        if seq.need_recache:
            row = self._recache_row(seq, pages, frames)
            if row is not None:
                return row
        if seq.step < self.num_steps:
            return self._denoise_row(seq, pages, frames)
        return self._commit_row(seq, pages, frames)

    def _prefill_row(self, seq: SeqState) -> Row:
        """The next chunk of the given context frames, committed at the context timestep."""
        kv, n = self.kv, seq.prefill_chunks[0]
        kv.begin_block(seq.sid, n)
        pages, frames = kv.context(seq.sid)
        start = kv.frames_committed(seq.sid)
        return Row(sid=seq.sid, kind=PREFILL, step=0, block=seq.block, frame_start=start, nframes=n,
                   context_pages=pages, context_frames=frames, write_pages=kv.commit(seq.sid, n))

    def _start_block(self, seq: SeqState) -> None:
        """Block boundary: prompt switches and actions take effect here, and the window makes room for the block."""
        kv = self.kv
        seq.block_started = True
        new_prompt = seq.prompt_plan.pop(seq.block, None) or seq.pending_prompt
        seq.pending_prompt = None
        if new_prompt is not None and new_prompt != seq.prompt:
            seq.prompt = new_prompt
            seq.need_recache = seq.recache_on_switch and bool(kv.held_pages(seq.sid))
            seq.prompt_changed = True
        n = seq.first_block_frames if (seq.block == 0 and seq.first_block_frames) else self.block_frames
        seq.block_nframes = n
        kv.begin_block(seq.sid, n)
        seq.frame_start = kv.frames_committed(seq.sid)
        if seq.pending_action is not None:
            seq.action, seq.pending_action = seq.pending_action, None
        acts = []
        for f in range(seq.frame_start, seq.frame_start + n):
            seq.action = seq.action_plan.pop(f, seq.action)
            acts.append(seq.action)
        seq.block_actions = acts
        if self.history:
            seq.action_history = (seq.action_history + acts)[-(self.history + n):]

    def _recache_row(self, seq: SeqState, pages: list, frames: list) -> Row | None:
        """Re-commit the visible window under the new prompt, into pages of its own (copy-on-write); None when no
        spare pages can take the copies of shared ones (then the old K/V stays)."""
        write = self.kv.copy_on_write(seq.sid, pages)
        if write is None:
            seq.need_recache = False
            return None
        return Row(sid=seq.sid, kind=RECACHE, step=0, block=seq.block, frame_start=frames[0], nframes=len(frames),
                   context_pages=[], context_frames=list(frames), write_pages=write, prompt=seq.prompt)

    def _denoise_row(self, seq: SeqState, pages: list, frames: list) -> Row:
        """One denoising step of the current block; it carries the new prompt on the block's first row."""
        row = Row(sid=seq.sid, kind=DENOISE, step=seq.step, block=seq.block, frame_start=seq.frame_start,
                  nframes=seq.block_nframes, context_pages=pages, context_frames=frames, actions=seq.block_actions,
                  past_actions=self._past(seq), last_step=seq.step == self.num_steps - 1,
                  prompt=seq.prompt if seq.prompt_changed else None, gen_start=seq.frame_start - seq.n_init)
        seq.prompt_changed = False
        return row

    def _commit_row(self, seq: SeqState, pages: list, frames: list) -> Row:
        """The clean block at the context timestep: its K/V goes into fresh pages."""
        return Row(sid=seq.sid, kind=COMMIT, step=0, block=seq.block, frame_start=seq.frame_start,
                   nframes=seq.block_nframes, context_pages=pages, context_frames=frames,
                   write_pages=self.kv.commit(seq.sid, seq.block_nframes), actions=seq.block_actions,
                   past_actions=self._past(seq))

    def _past(self, seq: SeqState) -> list | None:
        """The conditions of the latent frames before the current block that the model looks back at."""
        if not self.history:
            return None
        return seq.action_history[:len(seq.action_history) - seq.block_nframes][-self.history:]

    def schedule(self) -> StepPlan:
        self._admit()
        groups: dict = defaultdict(list)
        for seq in self.seqs.values():
            if seq.status != RUNNING:
                continue
            row = self._row(seq)
            groups[(row.kind, row.nframes)].append(row)
        plan = StepPlan()
        for (kind, n), rows in groups.items():
            for i in range(0, len(rows), self.max_batch):
                plan.groups.append(Group(kind=kind, nframes=n, rows=rows[i:i + self.max_batch]))
        return plan

    def update(self, plan: StepPlan) -> list[int]:
        """Advance counters after the runner executed the plan; returns sids that finished."""
        done = []
        for row in plan.rows():
            seq = self.seqs.get(row.sid)
            if seq is None:  # ended during the step (failed on its own): its pages are already back
                continue
            if row.kind == PREFILL:
                seq.prefill_chunks.pop(0)
            elif row.kind == RECACHE:
                seq.need_recache = False
            elif row.kind == DENOISE:
                seq.step += 1
            elif row.kind == COMMIT:
                seq.block += 1
                seq.step = 0
                seq.block_started = False
                if seq.total_blocks is not None and seq.block >= seq.total_blocks:
                    done.append(row.sid)
        for sid in done:
            self.release(sid, FINISHED)
        return done
