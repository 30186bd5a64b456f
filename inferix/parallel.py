"""Multi-GPU execution: Ulysses sequence parallelism and CFG parallelism over torch.distributed.

Every rank runs the same engine on the same calls (SPMD): the scheduler is plain deterministic Python, so each
rank makes the same plan, and ``check_plan`` proves it every step (a digest of the plan from every rank, compared
with rank 0's). What differs between ranks is only what a forward pass holds:

- Ulysses (``sp`` ranks): outside attention a rank holds 1/sp of the tokens of every latent frame of the block
  (a slice of each frame, so per-frame modulation and RoPE work unchanged); around each self- and cross-attention
  an all-to-all trades that for every token of H/sp heads. The paged KV pool of a rank holds only its heads, so
  the cache memory per GPU falls by sp, and so does the text (cross-attention) K/V. The prediction is gathered
  back to every rank after the head, so everything after a forward (solver, decoder) is replicated.
- CFG parallelism (``cfg_parallel``): world = 2 x sp. The ranks of group 0 run the conditional denoising passes,
  those of group 1 the unconditional ones (the same plan and cache, each its own copy); the two predictions are
  exchanged between rank i and rank i + sp and combined on both. Commit passes run in both groups.

Heads that do not divide by sp are padded with zero heads (a rank may then hold a padding head; its output is
dropped), and so are a frame's tokens that do not divide by sp (padding tokens are dropped before attention, so
no real token ever sees one). Both are exact, not approximations: see tests/test_distributed.py.

Collectives are torch.distributed's own (all_to_all_single and all_gather run on gloo for CPU tests and on
NCCL): yunchang's Ulysses layer is a thin wrapper over the same all_to_all_single around dense attention, while
here attention reads a paged cache through the engine's own backends (docs/multi-gpu.md). Every collective runs
under the process group's timeout; a peer that dies, stops answering or disagrees raises ``ParallelError``.

The model takes part through two duck-typed hooks: an attention backend with a ``sequence_parallel`` attribute
(``UlyssesBackend``) makes ``CausalWanDiT.forward`` split its tokens and gather its prediction, and a text K/V
pair with an ``attend`` attribute routes cross-attention through the all-to-all.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import sys
import threading
import time

import torch
import torch.nn.functional as F

from inferix.kernels.attention import AttentionBackend, PagedMeta
from inferix.models.wan_dit import TextKV

__all__ = ["Parallel", "ParallelError", "UlyssesBackend", "init_parallel", "lead_or_follow", "LeaderEngine",
           "DiscardWriter", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300.0  # longest wait in one collective: a slow model load on one rank must fit in it
STARTUP_TIMEOUT_S = 600.0  # joining the process group: the ranks may start (import, load) at different speeds


class ParallelError(RuntimeError):
    """A parallel run cannot go on: a rank failed, was killed, stopped answering, or planned differently."""


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return default if v in (None, "") else int(v)


def init_parallel(sp: int = 1, cfg_parallel: bool = False, *, timeout_s: float | None = None,
                  backend: str | None = None, init_method: str | None = None) -> "Parallel | None":
    """Join the process group torchrun started (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment) and build
    the groups for ``sp``-way Ulysses and, with ``cfg_parallel``, two CFG groups. Returns None for a plain
    single-process run (sp 1, no CFG parallelism, one process). ``timeout_s`` bounds every collective (default
    INFERIX_DIST_TIMEOUT or 300 s); ``backend`` defaults to nccl when CUDA is available, else gloo."""
    if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
        raise ValueError(f"--sp must be an int >= 1, got {sp!r}")
    need = sp * (2 if cfg_parallel else 1)
    world = _env_int("WORLD_SIZE", 1)
    if need == 1 and world == 1:
        return None
    launch = f"torchrun --nproc-per-node {need} -m inferix ..."
    if world != need:
        what = f"--sp {sp}" + (" --cfg-parallel" if cfg_parallel else "")
        raise ValueError(f"{what} runs on {need} processes, this run has {world}; launch it with {launch}")
    if init_method is None and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise ValueError(f"no process group to join (MASTER_ADDR/MASTER_PORT unset); launch with {launch}")
    import torch.distributed as dist
    if timeout_s is None:
        timeout_s = float(os.environ.get("INFERIX_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if timeout_s <= 0:
        raise ValueError(f"the collective timeout must be positive, got {timeout_s}")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    backend = backend or os.environ.get("INFERIX_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=max(timeout_s, STARTUP_TIMEOUT_S)))
    return Parallel(sp, cfg_parallel, device=device, timeout_s=timeout_s)


class Parallel:
    """This rank's place in the run and the collectives the engine needs (each bounded by the group timeout)."""

    def __init__(self, sp: int, cfg_parallel: bool, *, device, timeout_s: float):
        import torch.distributed as dist
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.sp, self.cfg = int(sp), bool(cfg_parallel)
        self.device = torch.device(device)
        self.timeout_s = float(timeout_s)
        self.sp_rank = self.rank % self.sp
        self.cfg_rank = self.rank // self.sp  # 0: conditional passes, 1: unconditional (with cfg_parallel)
        # Every rank creates every group, in the same order (new_group is itself collective). The groups the run
        # uses carry the collective timeout; the default group keeps the longer one it joined with.
        td = datetime.timedelta(seconds=self.timeout_s)
        self.group = dist.new_group(list(range(self.world)), timeout=td)
        self.sp_group = self.cfg_group = None
        groups = 2 if self.cfg else 1
        for g in range(groups):
            ranks = list(range(g * self.sp, (g + 1) * self.sp))
            pg = dist.new_group(ranks, timeout=td) if groups > 1 and self.sp > 1 else self.group
            if self.rank in ranks:
                self.sp_group = pg
        if self.cfg:
            for i in range(self.sp):
                pg = dist.new_group([i, i + self.sp], timeout=td)
                if self.rank % self.sp == i:
                    self.cfg_group = pg
        self.ulysses = Ulysses(self) if self.sp > 1 else None
        self.steps = 0
        self.comm_s = 0.0  # seconds spent in collectives (synchronised), for the benchmark's communication share
        self.timed = False  # when True, CUDA collectives are synchronised so comm_s is their real time

    # ---- facts ------------------------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def runs_uncond(self) -> bool:
        """This rank's group runs the unconditional passes of classifier-free guidance."""
        return self.cfg and self.cfg_rank == 1

    def local_heads(self, heads: int) -> int:
        """Heads of the KV pool on this rank: ceil(heads / sp) (the last ranks may hold zero padding heads)."""
        return -(-heads // self.sp)

    def describe(self) -> dict:
        return {"rank": self.rank, "world": self.world, "sp": self.sp, "cfg_parallel": self.cfg,
                "backend": self.dist.get_backend()}

    # ---- collectives ------------------------------------------------------------------------------
    def _run(self, what: str, fn):
        tic = time.perf_counter()
        try:
            out = fn()
            if self.timed and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except ParallelError:
            raise
        except Exception as e:  # gloo: connection closed / timed out; NCCL: DistBackendError
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ParallelError(f"rank {self.rank} of {self.world}: {what} failed: another rank failed, was killed "
                                f"or stopped answering (collective timeout {self.timeout_s:g} s) [{type(e).__name__}: "
                                f"{first}]") from e
        self.comm_s += time.perf_counter() - tic
        return out

    def all_to_all(self, x: torch.Tensor, group) -> torch.Tensor:
        """x [n, ...]: chunk j goes to rank j of the group; returns [n, ...] with chunk i from rank i."""
        x = x.contiguous()
        out = torch.empty_like(x)
        self._run("all-to-all", lambda: self.dist.all_to_all_single(out, x, group=group))
        return out

    def all_gather(self, x: torch.Tensor, group, n: int) -> torch.Tensor:
        """x [...] of every rank of the group -> [n, ...] in rank order."""
        x = x.contiguous()
        if self.dist.get_backend(group) == "nccl":
            out = x.new_empty((n,) + tuple(x.shape))
            self._run("all-gather", lambda: self.dist.all_gather_into_tensor(out, x, group=group))
            return out
        parts = [torch.empty_like(x) for _ in range(n)]
        self._run("all-gather", lambda: self.dist.all_gather(parts, x, group=group))
        return torch.stack(parts)

    def check_same(self, what: str, text: str) -> None:
        """Raise ParallelError on every rank unless every rank passes the same text."""
        digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)
        got = self.all_gather(torch.tensor([digest], dtype=torch.int64, device=self.device), self.group, self.world)
        got = got.flatten().tolist()
        bad = [r for r, d in enumerate(got) if d != got[0]]
        if bad:
            raise ParallelError(f"rank {self.rank}: ranks {bad} disagree with rank 0 on {what}; every rank must make "
                                f"the same calls with the same arguments")

    def check_plan(self, plan) -> None:
        """Every step: the plan (plain data) must be the same on every rank, or paging would diverge."""
        self.steps += 1
        self.check_same(f"the plan of step {self.steps}", repr(plan))

    def max_over_ranks(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        return float(self.all_gather(t, self.group, self.world).max())

    def cfg_exchange(self, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This group's prediction -> (conditional, unconditional), the same on both groups."""
        both = self.all_gather(pred, self.cfg_group, 2)
        return both[0], both[1]

    def broadcast_object(self, obj=None):
        """Rank 0's obj on every rank (pickled)."""
        box = [obj]
        self._run("broadcast", lambda: self.dist.broadcast_object_list(box, src=0, group=self.group,
                                                                      device=self.device))
        return box[0]

    # ---- engine -----------------------------------------------------------------------------------
    def attach(self, engine) -> None:
        """Make an engine built with ``Engine(parallel=self)`` run its share: the Ulysses backend, text K/V of
        this rank's heads, CFG passes by group; and check that every rank built the same engine."""
        bundle = engine.bundle
        if engine.compile is not None or engine.runner.graphs is not None:
            raise ValueError("--compile and --cuda-graphs do not run with --sp / --cfg-parallel yet")
        if self.cfg and (bundle.sampling.guidance_scale == 1.0 or bundle.sampling.sampler != "euler"):
            raise ValueError(f"--cfg-parallel needs a model sampled with classifier-free guidance (euler sampler, "
                             f"guidance_scale != 1); {bundle.name!r} runs {bundle.sampling.sampler} with "
                             f"guidance_scale {bundle.sampling.guidance_scale:g}")
        if engine.device != self.device and not (engine.device.type == self.device.type == "cpu"):
            raise ValueError(f"rank {self.rank} runs on {self.device}, the engine was built on {engine.device}")
        if self.ulysses is not None:
            engine.backend = engine.runner.backend = UlyssesBackend(engine.backend, self.ulysses)
        engine.runner.parallel = self
        cfg = engine.dit.config
        self.check_same("the engine settings", repr((cfg, bundle.sampling, engine.height, engine.width, engine.window,
                                                     engine.sink, engine.positions, engine.pool.num_pages,
                                                     engine.backend.name, engine.kv_lanes)))

    def shard_text(self, kv: TextKV) -> TextKV:
        """Text K/V of every head [B, H, Lt, D] -> this rank's heads [B, ceil(H/sp), Lt, D]."""
        if self.ulysses is None:
            return kv
        return TextKV([(self.ulysses.local_heads(k, 1), self.ulysses.local_heads(v, 1)) for k, v in kv.kv])

    def close(self) -> None:
        """Leave the process group, all ranks together: a rank that tears its group down while a peer still talks
        to it can make gloo abort the process at exit."""
        if self.dist.is_initialized():
            try:
                self.dist.barrier(group=self.group)
            except Exception:  # noqa: BLE001 - a peer already gone: tear down regardless
                pass
            self.dist.destroy_process_group()


class Ulysses:
    """The token and head layout of one forward pass on this rank of the sequence-parallel group.

    A pass of F frames of T tokens (frame-major) is padded to T' = sp * ceil(T / sp) tokens per frame; rank r holds
    tokens [r*T'/sp, (r+1)*T'/sp) of every frame. ``split`` records F and T for the pass; the backend's all-to-alls
    and ``gather`` use them."""

    def __init__(self, par: Parallel):
        self.par, self.n, self.r = par, par.sp, par.sp_rank
        self.group = par.sp_group
        self.frames = self.tokens = None

    def _pad(self, x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        if x.shape[dim] == size:
            return x
        shape = list(x.shape)
        shape[dim] = size - x.shape[dim]
        return torch.cat([x, x.new_zeros(shape)], dim=dim)

    def local_heads(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's heads of x along dim (zero padding heads where sp does not divide them)."""
        hl = -(-x.shape[dim] // self.n)
        return self._pad(x, dim, hl * self.n).narrow(dim, self.r * hl, hl).contiguous()

    def _take(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, F*T, ...] -> this rank's tokens [B, F*T'/sp, ...]."""
        B, Fr, T = x.shape[0], self.frames, self.tokens
        tl = -(-T // self.n)
        x = self._pad(x.reshape(B, Fr, T, *x.shape[2:]), 2, tl * self.n)
        return x[:, :, self.r * tl:(self.r + 1) * tl].reshape(B, Fr * tl, *x.shape[3:])

    def split(self, tokens, cos, sin, frames: int, context: TextKV):
        """Called by the model after the patch embedding: tokens [B, F*T, dim] and RoPE cos/sin [B, F*T, D/2] ->
        this rank's tokens; the text K/V are marked so cross-attention runs through the all-to-all."""
        self.frames, self.tokens = frames, tokens.shape[1] // frames
        ctx = TextKV([_ShardedKV(k, v, self.cross_attend) for k, v in context.kv])
        return self._take(tokens), self._take(cos), self._take(sin), ctx

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """Called by the model after the head: this rank's rows [B, F*T'/sp, C] -> every token [B, F*T, C]."""
        B, L, C = out.shape
        Fr, T = self.frames, self.tokens
        parts = self.par.all_gather(out, self.group, self.n)  # [n, B, F*tl, C]
        tl = L // Fr
        full = parts.view(self.n, B, Fr, tl, C).permute(1, 2, 0, 3, 4).reshape(B, Fr, self.n * tl, C)
        return full[:, :, :T].reshape(B, Fr * T, C)

    def heads_in(self, ts: list) -> list:
        """[B, F*T'/sp, H, D] each (this rank's tokens, every head) -> [B, F*T, Hl, D] (every real token, this
        rank's heads), in one all-to-all when the dtypes agree."""
        if len({t.dtype for t in ts}) > 1:
            return [self.heads_in([t])[0] for t in ts]
        S = len(ts)
        B, L, H, D = ts[0].shape
        n, Fr, T = self.n, self.frames, self.tokens
        tl, hl = L // Fr, -(-H // n)
        x = self._pad(torch.stack(ts), 3, hl * n)  # [S, B, F*tl, H', D]
        x = x.view(S, B, Fr, tl, n, hl, D).permute(4, 0, 1, 2, 3, 5, 6)  # [n (head group -> rank), S, B, F, tl, hl, D]
        y = self.par.all_to_all(x, self.group)  # [n (token slice <- rank), S, B, F, tl, hl, D]
        y = y.permute(1, 2, 3, 0, 4, 5, 6).reshape(S, B, Fr, n * tl, hl, D)[:, :, :, :T]  # padding tokens dropped
        return list(y.reshape(S, B, Fr * T, hl, D).unbind(0))

    def heads_out(self, out: torch.Tensor, heads: int) -> torch.Tensor:
        """The inverse of ``heads_in``: [B, F*T, Hl, D] -> [B, F*T'/sp, heads, D]."""
        B, L, hl, D = out.shape
        n, Fr, T = self.n, self.frames, self.tokens
        tl = -(-T // n)
        x = self._pad(out.reshape(B, Fr, T, hl, D), 2, tl * n)
        x = x.view(B, Fr, n, tl, hl, D).permute(2, 0, 1, 3, 4, 5)  # [n (token slice -> rank), B, F, tl, hl, D]
        y = self.par.all_to_all(x, self.group)  # [n (head group <- rank), B, F, tl, hl, D]
        y = y.permute(1, 2, 3, 0, 4, 5).reshape(B, Fr * tl, n * hl, D)
        return y[:, :, :heads]

    def cross_attend(self, q, k, v):
        """Cross-attention of this rank's tokens: q [B, H, L, D] (every head), k/v [B, Hl, Lt, D] (this rank's
        heads; every head is cut down here) -> [B, H, L, D]."""
        H = q.shape[1]
        if k.shape[1] == H and self.n > 1:
            k, v = self.local_heads(k, 1), self.local_heads(v, 1)
        (qf,) = self.heads_in([q.transpose(1, 2)])  # [B, F*T, Hl, D]
        out = F.scaled_dot_product_attention(qf.transpose(1, 2), k.to(q.dtype), v.to(q.dtype))  # [B, Hl, F*T, D]
        return self.heads_out(out.transpose(1, 2), H).transpose(1, 2)


class _ShardedKV(tuple):
    """(k, v) of one layer's text, with the cross-attention that runs them under sequence parallelism."""

    def __new__(cls, k, v, attend):
        t = super().__new__(cls, (k, v))
        t.attend = attend
        return t


class UlyssesBackend(AttentionBackend):
    """Wraps an attention backend: an all-to-all gives it every token of this rank's heads (the pool holds only
    those), another gives the output back to the token slices. ``sequence_parallel`` tells the model to split."""

    def __init__(self, inner: AttentionBackend, ulysses: Ulysses):
        self.inner, self.sequence_parallel = inner, ulysses
        self.name = inner.name

    @staticmethod
    def _needs_raw(meta, k_raw) -> bool:  # unrotated keys are only read by a cache write of cache-relative RoPE
        return (k_raw is not None and isinstance(meta, PagedMeta) and meta.write_pages is not None
                and meta.cache_cos is not None)

    def attend(self, q, k, v, layer: int, meta, k_raw=None):
        sp = self.sequence_parallel
        raw = self._needs_raw(meta, k_raw)
        full = sp.heads_in([q, k, v] + ([k_raw] if raw else []))
        out = self.inner.attend(full[0], full[1], full[2], layer, meta, k_raw=full[3] if raw else None)
        return sp.heads_out(out, q.shape[2])

    def write_kv(self, k, v, layer: int, meta, k_raw=None) -> None:
        raw = self._needs_raw(meta, k_raw)
        full = self.sequence_parallel.heads_in([k, v] + ([k_raw] if raw else []))
        self.inner.write_kv(full[0], full[1], layer, meta, k_raw=full[2] if raw else None)


class DiscardWriter:
    """What a follower rank writes to: nothing (only rank 0 writes files)."""

    def __init__(self):
        self.frames = 0

    def write(self, frames) -> None:
        self.frames += len(frames)

    def close(self):
        return None

    def abort(self) -> None:
        pass


def exit_now(code: int) -> None:
    """End this rank at once after an error (no teardown that could wait on a dead peer); torchrun then ends the
    others, and gloo peers see the closed connection in their next collective."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- serving: rank 0 serves, the other ranks follow its calls ----------------------------------------------
_STOP, _NOOP = "stop", "noop"
ENGINE_CALLS = ("open_session", "step", "run_until_idle", "clear_prefixes")
SESSION_CALLS = ("set_prompt", "act", "pause", "resume", "cancel", "fork")


def lead_or_follow(engine, heartbeat_s: float | None = None) -> "LeaderEngine | None":
    """For servers: on rank 0 (or without ``parallel``), the handle to serve with: every call that changes the
    engine's state (``ENGINE_CALLS`` on it, ``SESSION_CALLS`` on the sessions it returns) is sent to the other
    ranks before it runs, so their engines make the same plans. On every other rank: follow rank 0's calls until
    it calls ``close()`` (or fails), then return None: the process has nothing more to do.

        handle = lead_or_follow(engine)
        if handle is None:
            return 0          # a follower rank, finished
        serve(handle)         # rank 0; handle.close() when the server stops

    While idle, rank 0 sends a heartbeat every ``heartbeat_s`` (default: a quarter of the collective timeout), so a
    quiet server does not time its followers out; a follower whose leader dies ends with ParallelError."""
    par = getattr(engine, "parallel", None)
    if par is None or par.is_leader:
        return LeaderEngine(engine, par, heartbeat_s)
    sessions = {}
    while True:
        msg = par.broadcast_object()
        if msg == _STOP:
            return None
        if msg == _NOOP:
            continue
        target, name, args, kw = msg
        obj = engine if target is None else sessions.get(target)
        try:
            out = getattr(obj, name)(*args, **kw)
        except ParallelError:
            raise
        except Exception:  # noqa: BLE001 - rank 0 met the same error in the same call and answers its client
            continue
        if name in ("open_session", "fork"):
            sessions[out.id] = out
        elif name == "cancel" and target in sessions:
            del sessions[target]


class LeaderEngine:
    """Rank 0's engine handle under ``lead_or_follow``: reads go straight to the engine; the calls in
    ``ENGINE_CALLS`` and ``SESSION_CALLS`` are broadcast first, under the engine's lock, so every rank applies them
    in the same order."""

    def __init__(self, engine, par, heartbeat_s: float | None = None):
        self._engine, self._par = engine, par
        self._sessions: dict = {}
        self._last = time.monotonic()
        self._closed = threading.Event()
        if par is not None:
            beat = heartbeat_s if heartbeat_s is not None else max(0.5, par.timeout_s / 4)
            threading.Thread(target=self._heartbeat, args=(beat,), daemon=True, name="inferix-heartbeat").start()

    def _heartbeat(self, every: float) -> None:
        while not self._closed.wait(every / 2):
            if time.monotonic() - self._last < every:
                continue
            with self._engine.lock:
                if self._closed.is_set():
                    return
                try:
                    self._send(_NOOP)
                except ParallelError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return

    def _send(self, msg) -> None:
        self._par.broadcast_object(msg)
        self._last = time.monotonic()

    def _call(self, target, name: str, args, kw):
        with self._engine.lock:
            if self._par is not None:
                if self._closed.is_set():
                    raise RuntimeError("this engine handle is closed")
                self._send((target, name, args, kw))
            obj = self._engine if target is None else self._sessions[target]._session
            return getattr(obj, name)(*args, **kw)

    def __getattr__(self, name):
        if name in ENGINE_CALLS:
            def call(*args, **kw):
                out = self._call(None, name, args, kw)
                return self._wrap(out) if name == "open_session" else out
            return call
        return getattr(self._engine, name)

    def _wrap(self, sess) -> "LeaderSession":
        h = LeaderSession(self, sess)
        self._sessions[sess.id] = h
        return h

    def restore(self, path):
        raise RuntimeError("restoring a snapshot does not run under --sp / --cfg-parallel (each rank holds only its "
                           "share of the KV cache)")

    def generate(self, prompt: str, num_frames: int, **kw):
        sess = self.open_session(prompt, num_frames=num_frames, **kw)
        try:
            yield from sess
        finally:
            if not sess.done and sess.status not in ("finished", "failed"):
                sess.cancel()

    def close(self) -> None:
        """Tell the follower ranks to return; this handle takes no more calls."""
        with self._engine.lock:
            if self._par is not None and not self._closed.is_set():
                self._send(_STOP)
            self._closed.set()


class LeaderSession:
    """A session handle under ``LeaderEngine``: control calls reach every rank; reads are local."""

    def __init__(self, leader: LeaderEngine, session):
        self._leader, self._session = leader, session

    def __getattr__(self, name):
        if name in SESSION_CALLS:
            def call(*args, **kw):
                out = self._leader._call(self._session.id, name, args, kw)
                return self._leader._wrap(out) if name == "fork" else out
            return call
        return getattr(self._session, name)

    def snapshot(self, path):
        raise RuntimeError("a snapshot under --sp / --cfg-parallel would hold rank 0's share of the KV cache only")

    def __iter__(self):
        return self.stream()

    def stream(self, between_steps=None):
        """As ``Session.stream``, with each engine step sent to every rank."""
        s = self._session
        while True:
            while s.blocks:
                yield s.blocks.popleft()
            if s.error is not None:
                raise s.error
            if s.done:
                return
            if s.status == "paused":
                raise RuntimeError(f"session {s.id} is paused; resume it before iterating")
            if between_steps is not None:
                between_steps(self)
            self._leader.step()
