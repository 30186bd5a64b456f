"""Public engine: load a model, open sessions, step the scheduler, stream decoded frames.

One engine step is ``plan = scheduler.schedule()`` -> ``runner.execute(plan)`` -> ``scheduler.update(plan)``.
Sessions share the step: rows of the same kind and size run in one batched forward.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Iterator

import numpy as np
import torch

from inferix.kernels.attention import KVPool, get_backend
from inferix.models.bundle import ModelBundle, default_model, load_model

from .defaults import resolve_engine_defaults
from .pages import AdmissionError, KVManager
from .prefixes import NoNoise, PrefixCache, prefix_key
from .profiling import Profiler
from .runner import GeneratorNoise, Runner
from .plan import PREFILL
from .host_tier import HostTier
from .scheduler import CANCELLED, FAILED, FINISHED, PAUSED, Scheduler, SeqState
from .session import Session, check_seed
from .session_plan import plan_session
from .sizing import check_memory, estimate_engine_bytes, pixel_to_latent

__all__ = ["Engine", "Session", "AdmissionError", "COMPILE_MODES"]

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class Engine:
    def __init__(self, bundle: ModelBundle, *, device="cpu", height: int | None = None, width: int | None = None,
                 window: int | None = -1, sink: int | None = None, attention: str | None = None,
                 positions: str = "auto", max_sessions: int = 4, kv_pages: int | None = None,
                 max_batch: int = 8, keep_latents: bool = False, model_options: dict | None = None,
                 memory_limit_gib: float | None = None, overlap_decode: bool | None = None, compile: str | None = None,
                 cuda_graphs: bool = False, fp8: bool = False, share_prefixes: bool = False, max_prefixes: int = 4,
                 host_pages: int = 0, parallel=None, **options):
        """``model_options``: the options the model takes (its adapter registers and checks them, see
        models/adapter.py); other keywords are taken as model options too (``Engine(b, name=value)``)."""
        for name, v, low in (("max_sessions", max_sessions, 1), ("max_batch", max_batch, 1),
                             ("max_prefixes", max_prefixes, 1),
                             ("kv_pages", kv_pages, 1), ("sink", sink, 0)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low):
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if isinstance(host_pages, bool) or not isinstance(host_pages, (int, np.integer)) or host_pages < 0:
            raise ValueError(f"host_pages must be an int >= 0 (0: no host-memory tier), got {host_pages!r}")
        if window is not None and window != -1 and (isinstance(window, bool) or
                                                     not isinstance(window, (int, np.integer)) or window < 1):
            raise ValueError(f"window must be a positive int, None (no window) or -1 (the model's), got {window!r}")
        self.bundle = bundle
        d = resolve_engine_defaults(bundle, window=window, sink=sink, kv_pages=kv_pages, max_sessions=max_sessions,
                                    device=device)
        self.device = torch.device(d.device)
        self.dit = bundle.dit
        cfg = self.dit.config
        self.height = int(height if height is not None else bundle.height)
        self.width = int(width if width is not None else bundle.width)
        mult = bundle.spatial_ratio * cfg.patch_size[1]
        for name, v in (("height", self.height), ("width", self.width)):
            if v <= 0 or v % mult:
                raise ValueError(f"{name} {v} must be a positive multiple of {mult} "
                                 f"(VAE stride {bundle.spatial_ratio} x patch {cfg.patch_size[1]})")
        self.latent_hw = (self.height // bundle.spatial_ratio, self.width // bundle.spatial_ratio)
        self.block_frames = bundle.sampling.block_frames
        self.window, self.sink = d.window, d.sink
        if positions == "auto":  # the model's own preference, else relative whenever a window is set
            positions = bundle.extra.get("positions") or ("relative" if self.window is not None else "absolute")
        self.positions = positions
        self.keep_latents = keep_latents
        page_tokens = self.dit.tokens_per_frame(*self.latent_hw)
        kv_pages = d.kv_pages
        # what is special about the model, with its options checked before anything is allocated
        self.adapter = bundle.adapter.configure({**(model_options or {}), **options})
        self.adapter.check_engine(cuda_graphs=cuda_graphs, parallel=parallel, positions=self.positions)
        dtype = next(self.dit.parameters()).dtype
        # Ulysses (inferix/parallel.py): this rank's pool holds its share of the heads only
        kv_heads = cfg.num_heads if parallel is None else parallel.local_heads(cfg.num_heads)
        # A page is one latent frame of a session in every lane: the stream's own K/V (lane 0) and each extra
        # lane the model asks for (lane j at pool row j * kv_pages + page). So those caches are pool memory, and
        # admission, eviction, forks and freeing cover them with the page they belong to.
        self.kv_lanes = 1 + self.adapter.lanes()
        need = estimate_engine_bytes(
            num_layers=cfg.num_layers, kv_rows=kv_pages * self.kv_lanes, page_tokens=page_tokens,
            num_heads=kv_heads, head_dim=cfg.head_dim, dtype_bytes=torch.finfo(dtype).bits // 8,
            height=self.height, width=self.width, block_pixel_frames=bundle.pixel_frames(self.block_frames + 1),
            group_shapes=self.adapter.cache_groups(page_tokens))
        check_memory(need, limit_gib=memory_limit_gib, device=self.device,
                     what=f"an engine of {kv_pages} KV pages at {self.width}x{self.height}")
        self.kv = KVManager(kv_pages, self.block_frames, self.window, self.sink)
        self.pool = KVPool.allocate(cfg.num_layers, kv_pages * self.kv_lanes, page_tokens, kv_heads,
                                    cfg.head_dim, dtype=dtype, device=self.device,
                                    groups=self.adapter.cache_groups(page_tokens))
        self.backend = get_backend(attention)
        self.scheduler = Scheduler(self.kv, bundle.sampling.num_steps, self.block_frames, max_batch=max_batch,
                                   history=self.adapter.condition_history())
        keep = None if self.window is None else self.window
        self.runner = Runner(bundle, self.pool, self.backend, latent_hw=self.latent_hw, positions=positions,
                             keep_frames=keep, keep_sink=self.sink or 0, device=self.device, adapter=self.adapter,
                             lane_stride=kv_pages,
                             overlap_decode=self.device.type == "cuda" if overlap_decode is None else overlap_decode)
        self._pending: deque = deque()  # (session handle, BlockOutput) whose frames are still being decoded
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count()
        self.lock = threading.RLock()
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        if fp8:  # the bundle's DiT itself, in place: torchao on SM89+ GPUs, an exact emulation elsewhere
            from inferix.models.quant import quantize_dit_fp8
            quantize_dit_fp8(self.dit)
        self.fp8 = fp8
        if compile is not None:  # the bundle's DiT itself: engines sharing a bundle share its compiled graphs
            self.dit.compile_blocks(compile)
        self.compile = compile
        if cuda_graphs:
            from .graphs import PassGraphs
            self.runner.graphs = PassGraphs(self.dit, self.device)  # refuses a device that is not CUDA
        self.profiler = Profiler(self)
        self.hooks: list = []  # callables(plan, outputs) run after each executed plan, before counters advance
        # shared start prefixes: hidden paused forks holding a finished prefill (see docs/snapshots.md)
        self.prefixes = PrefixCache(int(max_prefixes)) if share_prefixes else None
        if share_prefixes:
            self.scheduler.reclaim = self._evict_prefix  # a waiting session first frees a kept prefix
        # host-memory tier: paused sessions move to host pages to admit waiting ones (see docs/snapshots.md)
        self.host = HostTier(self, int(host_pages)) if host_pages else None
        self.scheduler.host = self.host
        self.parallel = parallel  # several ranks run this engine in step (inferix/parallel.py, docs/multi-gpu.md)
        if parallel is not None:
            parallel.attach(self)

    @classmethod
    def from_pretrained(cls, path_or_preset=None, *, device=None, dtype=None, vae=None, text_encoder=None,
                        sampling=None, decoder=None, decoder_weights=None, **kw) -> "Engine":
        """Load a preset (``MODEL_NAMES``; default: ``default_model()``) or a checkpoint path and build an engine."""
        if path_or_preset is None:
            path_or_preset = default_model()
        d = resolve_engine_defaults(device=device, dtype=dtype)  # what loading needs; the engine resolves the rest
        bundle = load_model(path_or_preset, device=d.device, dtype=d.dtype, vae=vae, text_encoder=text_encoder,
                            sampling=sampling, decoder=decoder, decoder_weights=decoder_weights)
        return cls(bundle, device=d.device, **kw)

    # ---- properties -----------------------------------------------------------------------------
    @property
    def model_options(self) -> dict:
        """The model options in force (models/adapter.py: ``ModelAdapter.settings``)."""
        return self.adapter.settings()

    def __getattr__(self, name):
        # a model option in force reads as an attribute too (engine.<option>), for callers of the keyword form
        adapter = self.__dict__.get("adapter")
        if adapter is not None and name in adapter.values:
            return adapter.values[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def fps(self) -> int:
        return self.bundle.fps

    @property
    def actions(self) -> list | None:
        return self.bundle.actions

    def action_id(self, action):
        """One pixel frame's action as the scheduler holds it: an id for a model of named actions, the keyboard
        and mouse values for a keyboard-and-mouse model (its adapter's ``parse_action``)."""
        return self.adapter.parse_action(action)

    def pixel_to_latent(self, num_frames: int) -> int:
        """Fewest latent frames that decode to at least num_frames pixel frames (the extra ones are trimmed)."""
        return pixel_to_latent(self.bundle, num_frames)

    # ---- sessions -------------------------------------------------------------------------------
    def open_session(self, prompt: str, *, num_frames: int | None = None, seed: int = 0, init_frames="auto",
                     actions=None, prompt_schedule=None, negative_prompt: str | None = None, noise=None,
                     recache: bool = False, text_embeds: torch.Tensor | None = None, init_image=None,
                     model_inputs: dict | None = None) -> Session:
        """Start a stream. num_frames counts output pixel frames (None: until cancelled, needs a window).

        init_frames: uint8 [T, H, W, 3] to continue from; "auto" (default) uses the model's own start (its
        adapter's ``start_frames``; most models start from nothing); None: from nothing.
        init_image: uint8 [H, W, 3], the start image of an image-conditioned model (Matrix-Game); model_inputs:
        what the model's adapter would encode from it, given directly (replays; see the model's adapter).
        """
        # Everything is checked and built before any page is reserved: a bad request leaves no trace.
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if num_frames is not None and (isinstance(num_frames, (bool, np.bool_)) or
                                       not isinstance(num_frames, (int, np.integer)) or num_frames <= 0):
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        if noise is None:
            noise = GeneratorNoise(check_seed(seed))
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a str, got {type(negative_prompt).__name__}")
        given = not isinstance(init_frames, str)
        if given and init_frames is not None and not self.adapter.takes_init_frames:
            raise ValueError(f"model {self.bundle.name!r} does not continue given frames (init_frames); it starts from "
                             f"a start image (init_image)")
        if not given:
            if init_frames != "auto":
                raise ValueError(f"init_frames must be frames, None or 'auto', got {init_frames!r}")
            init_frames = self.adapter.start_frames(prompt, seed)
        init_latents = None
        if init_frames is not None:
            init_latents = self._encode_init(init_frames, given)
        n_init = 0 if init_latents is None else init_latents.shape[1]
        plan = plan_session(self.bundle, prompt=prompt, num_frames=num_frames, n_init=n_init, window=self.window,
                            pool_pages=self.kv.num_pages, actions=actions, action_id=self.action_id,
                            prompt_schedule=prompt_schedule, latent_condition=self.adapter.latent_condition)
        # raised above when it can never fit; now what the model is conditioned on (a start image), still before
        # any page is reserved
        cond_embeds, inputs = self.adapter.session_inputs(
            init_image=init_image, model_inputs=model_inputs, height=self.height, width=self.width,
            latent_frames=plan.total_latent)
        if cond_embeds is not None:
            if text_embeds is not None:
                raise ValueError("give either text_embeds or a start image (init_image / model_inputs), not both")
            text_embeds = cond_embeds
        start_prompt = plan.prompt
        key = None
        if self.prefixes is not None and init_latents is not None:
            key = prefix_key(init_latents, start_prompt, text_embeds)
        negative = negative_prompt or self.bundle.sampling.negative_prompt
        with self.lock:
            sid = next(self._ids)
            seq = SeqState(sid=sid, prompt=start_prompt, total_blocks=plan.total_blocks, budget=plan.budget,
                           recache_on_switch=recache, action_plan=plan.action_plan, prompt_plan=plan.prompt_plan,
                           n_init=n_init, first_block_frames=plan.first_block_frames,
                           action=self.adapter.idle_action())
            if key is not None and self._open_from_prefix(key, seq, noise, negative):
                self.prefixes.hits += 1
            else:
                seq.prefill_chunks = list(plan.prefill_chunks)
                self.runner.add_session(sid, seq.prompt, noise, negative_prompt=negative,
                                        init_latents=init_latents, text_embeds=text_embeds,
                                        chunks=list(seq.prefill_chunks), inputs=inputs)
                try:
                    self.scheduler.add(seq)
                except BaseException:
                    self.runner.drop(sid)
                    raise
                if key is not None:
                    self.prefixes.misses += 1
                    self.prefixes.sources[sid] = key
            sess = Session(self, seq, num_frames)
            self.sessions[sid] = sess
            self.profiler.session_opened(sid)
        return sess

    def restore(self, path) -> Session:
        """A paused session continuing the snapshot at ``path`` (``Session.snapshot``); ``resume()`` runs it."""
        from .snapshot import restore_session
        return restore_session(self, path)

    def _encode_init(self, frames, given: bool = True) -> torch.Tensor:
        dec = self.bundle.decoder
        if dec is None:
            raise ValueError("init_frames need a decoder/encoder (VAE) in the model bundle")
        f = np.asarray(frames)
        if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8:
            raise ValueError(f"init_frames must be uint8 [T, H, W, 3], got {f.dtype} {f.shape}")
        if not len(f):
            raise ValueError("init_frames holds no frames (shape [0, H, W, 3]); pass None to start from nothing")
        if f.shape[1:3] != (self.height, self.width) and not given:
            raise ValueError(f"{self.bundle.name!r} starts from its own {f.shape[2]}x{f.shape[1]} frames, but the "
                             f"engine runs {self.width}x{self.height}: run it at {f.shape[2]}x{f.shape[1]}, or pass "
                             f"init_frames of {self.width}x{self.height} (or None)")
        if f.shape[1:3] != (self.height, self.width):
            raise ValueError(f"init_frames are {f.shape[2]}x{f.shape[1]}, the engine runs {self.width}x{self.height}")
        with torch.no_grad():
            return dec.encode(f).to(self.device, torch.float32)

    def _fork(self, sess: Session) -> Session:
        with self.lock:
            self._drain(wait_for=sess)  # its decoder state is copied: every decode it handed over must be done
            sid = next(self._ids)
            src = self.scheduler.seqs.get(sess.id)
            if src is None:
                raise RuntimeError(f"session {sess.id} has ended ({sess.status}); it cannot be forked")
            seq = self.scheduler.fork(sess.id, sid)
            self.runner.fork(sess.id, sid)
            child = Session(self, seq, sess.num_frames)
            child.frames_out = sess.frames_out
            self.sessions[sid] = child
            self.profiler.session_opened(sid)
        return child

    # ---- shared start prefixes ------------------------------------------------------------------
    def _open_from_prefix(self, key, seq: SeqState, noise, negative: str) -> bool:
        """Start seq (fresh counters, its own budget) as a fork of the prefix kept for key; False when there is
        none or it cannot start now (then it runs its own prefill)."""
        holder = self.prefixes.get(key)
        if holder is None or self.scheduler.queue:  # others wait for pages: no overtaking
            return False
        kv = self.kv
        while not kv.can_allocate(seq.budget) and self._evict_prefix(keep=key):
            pass
        take = not kv.can_allocate(seq.budget)  # fits only without its holder: the session takes its pages over
        if take and not kv.can_allocate(seq.budget - kv.budget_of(holder)):
            return False
        self.runner.fork(holder, seq.sid)
        st = self.runner.sessions[seq.sid]
        st.noise, st.negative_prompt = noise, negative
        try:
            self.scheduler.share(holder, seq, take=take)
        except BaseException:
            self.runner.drop(seq.sid)
            raise
        if take:
            del self.prefixes.holders[key]
            self.runner.drop(holder)
        return True

    def _keep_prefix(self, sid: int, key) -> None:
        """Keep a hidden paused fork of session sid, whose given frames are all committed and whose first
        generated block has not started."""
        p = self.prefixes
        src = self.scheduler.seqs.get(sid)
        if key in p.holders or src is None or src.prefill_chunks or src.block_started or self.scheduler.queue:
            return
        while len(p.holders) >= p.max_prefixes and self._evict_prefix():
            pass
        pages = len(self.kv.held_pages(sid))
        if not self.kv.can_allocate(pages):
            return
        hid = next(self._ids)
        hold = SeqState(sid=hid, prompt=src.prompt, total_blocks=0, budget=pages)  # it never commits a page
        hold.n_init, hold.first_block_frames = src.n_init, src.first_block_frames
        self.scheduler.share(sid, hold)
        hold.status = PAUSED
        self.runner.fork(sid, hid)
        self.runner.sessions[hid].noise = NoNoise()
        p.holders[key] = hid

    def _evict_prefix(self, keep=None) -> bool:
        """End the least recently used kept prefix (other than keep's); False when there is none."""
        if self.prefixes is None:
            return False
        lru = self.prefixes.lru(keep)
        if lru is None:
            return False
        key, hid = lru
        del self.prefixes.holders[key]
        self.prefixes.evicted += 1
        self.scheduler.release(hid, CANCELLED, admit=False)
        self.runner.drop(hid)
        return True

    def clear_prefixes(self) -> int:
        """End every kept prefix (their pages go back unless a session shares them); returns how many."""
        n = 0
        with self.lock:
            while self._evict_prefix():
                n += 1
            self.scheduler._admit()
        return n

    def _fail(self, sid: int, error: BaseException) -> None:
        s = self.sessions.get(sid)
        if s is not None:
            s.error = error
        self._release(sid, FAILED)

    def _release(self, sid: int, status: str) -> None:
        self.scheduler.release(sid, status)
        self._forget(sid)

    def _forget(self, sid: int) -> None:
        """Drop every trace of an ended session (its handle keeps its frames and final status)."""
        self.runner.drop(sid)
        if self.prefixes is not None:
            self.prefixes.sources.pop(sid, None)
        sess = self.sessions.pop(sid, None)
        if sess is None or not sess.pending:  # else when its last frames are delivered
            self.profiler.forget(sid)

    # ---- stepping -------------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one engine step; False when there was nothing to do."""
        with self.lock:
            plan = self.scheduler.schedule()
            if self.parallel is not None:  # the same plan on every rank, or paging would diverge
                self.parallel.check_plan(plan)
            if plan.empty:
                if self._pending:  # nothing to compute: wait for the oldest decode
                    self._drain(wait_for=self._pending[0][0])
                    return True
                return False
            tic = time.perf_counter()
            try:
                outs, faults = self.runner.execute(plan)
                for sid, e in faults.items():  # a session's own failure ends that session only
                    self._fail(sid, e)
                for hook in self.hooks:
                    hook(plan, outs)
            except BaseException as e:
                for row in plan.rows():  # the sessions of a failed batched pass end now and give their pages back
                    self._fail(row.sid, e)
                raise
            finished = self.scheduler.update(plan)
            if self.prefixes is not None and self.prefixes.sources:  # prefills that just ended become prefixes
                for g in plan.groups:
                    for row in g.rows if g.kind == PREFILL else ():
                        key = self.prefixes.sources.get(row.sid)
                        seq = self.scheduler.seqs.get(row.sid)
                        if key is not None and seq is not None and not seq.prefill_chunks:
                            del self.prefixes.sources[row.sid]
                            self._keep_prefix(row.sid, key)
            for o in outs:
                sess = self.sessions.get(o.sid)
                if isinstance(o.frames, Future):
                    if sess is not None:
                        sess.pending += 1
                        self._pending.append((sess, o))
                else:
                    self._deliver(sess, o)
            for sid in finished:
                self._forget(sid)
            # frames decoded meanwhile go out now; a stream's first frames are waited for (time to first frame)
            first = next((s for s, _ in self._pending if s.frames_out == 0 and not s.blocks), None)
            self._drain(wait_for=first)
            self.profiler.step_done(plan, outs, time.perf_counter() - tic)
            return True

    def _drain(self, wait_for: Session | None = None) -> None:
        """Deliver overlapped decodes that are done, in order; with wait_for, first wait until that session has
        nothing left in decode."""
        while self._pending:
            sess, out = self._pending[0]
            if not out.frames.done() and not (wait_for is not None and wait_for.pending):
                return
            self._pending.popleft()
            sess.pending -= 1
            try:
                out.frames = out.frames.result()
            except Exception as e:  # noqa: BLE001 - that stream's decoder failed: it ends alone
                if sess.error is None:
                    sess.error = e
                if sess.id in self.scheduler.seqs:
                    self._fail(sess.id, e)
                continue
            self._deliver(sess, out)
            if not sess.pending and sess.id not in self.sessions:
                self.profiler.forget(sess.id)

    def _deliver(self, sess: Session | None, out) -> None:
        if sess is None:
            return
        if self.keep_latents:
            sess.latents.append(out.latents)
        frames = out.frames
        if frames is None:
            frames = np.zeros((0,), dtype=np.uint8)
        elif sess.num_frames is not None:
            frames = frames[: max(0, sess.num_frames - sess.frames_out)]
        sess.frames_out += len(frames)
        sess.blocks.append(frames)
        self.profiler.block_delivered(out.sid, len(frames))

    def run_until_idle(self, max_steps: int | None = None) -> int:
        n = 0
        while (max_steps is None or n < max_steps) and self.step():
            n += 1
        return n

    def generate(self, prompt: str, num_frames: int, *, seed: int = 0, init_frames="auto", actions=None,
                 prompt_schedule=None, **kw) -> Iterator[np.ndarray]:
        """Yield uint8 frame blocks [T, H, W, 3] as soon as each block is decoded; num_frames pixel frames in all."""
        sess = self.open_session(prompt, num_frames=num_frames, seed=seed, init_frames=init_frames,
                                 actions=actions, prompt_schedule=prompt_schedule, **kw)
        try:
            yield from sess
        finally:
            if not sess.done and sess.status not in (FINISHED, FAILED):
                sess.cancel()

    @property
    def waiting(self) -> int:
        """Sessions waiting for KV pages."""
        return len(self.scheduler.queue)

    @property
    def pages_in_use(self) -> int:
        return self.kv.pages_in_use

    def stats(self) -> dict:
        s = self.profiler.summary()
        if self.prefixes is not None:
            s["prefixes"] = self.prefixes.stats()
        if self.host is not None:
            s["host_pages"] = self.host.stats()
        return s
