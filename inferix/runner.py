"""The runner owns every tensor: noise, latents, the KV page pool, text K/V, decoder stream states.

``execute(plan)`` runs each group of the plan as one forward pass of the DiT over the paged cache and returns,
per session, the decoded frames of blocks that became clean.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from inferix.kernels.attention import KVPool, PagedMeta
from inferix.models.adapter import ModelAdapter
from inferix.models.bundle import ModelBundle
from inferix.models.schedule import make_sampler
from inferix.models.wan_dit import TextKV

from .overlap import DecodeWorker
from .pages import kept_frames
from .plan import COMMIT, DENOISE, PREFILL, RECACHE, StepPlan

__all__ = ["Runner", "GeneratorNoise", "RecordedNoise", "BlockOutput"]


class GeneratorNoise:
    """Noise from a per-session seeded CPU generator: the same seed gives the same video on any device."""

    def __init__(self, seed: int):
        self.gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def initial(self, block: int, start: int, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen)

    def renoise(self, block: int, step: int, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen)

    def clone(self) -> "GeneratorNoise":
        c = GeneratorNoise(0)
        c.gen.set_state(self.gen.get_state())
        return c


class RecordedNoise:
    """Replays recorded noise: ``initial`` [F_generated, C, H, W] sliced at each block's generated-frame offset,
    ``renoise[(block, step)]`` for the later steps."""

    def __init__(self, initial: torch.Tensor, renoise: dict):
        self.init, self.re = initial, renoise

    def initial(self, block: int, start: int, shape) -> torch.Tensor:
        n = shape[0]
        if start + n > self.init.shape[0]:
            raise KeyError(f"recorded initial noise has {self.init.shape[0]} frames, block {block} needs "
                           f"frames {start}..{start + n - 1}")
        return self.init[start:start + n].reshape(shape)

    def renoise(self, block: int, step: int, shape) -> torch.Tensor:
        try:
            return self.re[(block, step)].reshape(shape)
        except KeyError:
            raise KeyError(f"no recorded noise for block {block} step {step}") from None

    def clone(self):
        return self


@dataclass
class BlockOutput:
    sid: int
    block: int
    frames: object  # uint8 [T, H, W, 3] (None without a decoder; a Future of them when decode overlaps)
    latents: torch.Tensor  # [F, C, h, w] clean latents of the block
    decode_s: float = 0.0  # seconds its decode took in the pass (0 when overlapped or without a decoder)


@dataclass
class SessionTensors:
    noise: object
    prompt: str
    negative_prompt: str = ""
    x: torch.Tensor | None = None  # current step input [F, C, h, w]
    x0: torch.Tensor | None = None  # latest clean prediction [F, C, h, w]
    decoder_state: object = None
    history: OrderedDict = field(default_factory=OrderedDict)  # abs frame -> clean latent [C, h, w]
    prefill: list = field(default_factory=list)  # latent chunks [n, C, h, w] still to commit
    text_embeds: torch.Tensor | None = None  # explicit context (bypasses the text encoder; image tokens of i2v models)
    inputs: dict = field(default_factory=dict)  # per-session tensors the model adapter's pass_inputs reads


class Runner:
    def __init__(self, bundle: ModelBundle, pool: KVPool, backend, *, latent_hw: tuple[int, int],
                 positions: str = "absolute", keep_frames: int | None = None, device="cpu",
                 adapter: ModelAdapter | None = None, lane_stride: int = 0, keep_sink: int = 0,
                 overlap_decode: bool = False):
        if positions not in ("absolute", "relative"):
            raise ValueError(f"positions must be 'absolute' or 'relative', got {positions!r}")
        self.bundle = bundle
        self.dit = bundle.dit
        self.pool = pool
        self.backend = backend
        self.positions = positions
        self.latent_hw = latent_hw
        self.keep_frames = keep_frames
        self.keep_sink = keep_sink  # first frames of a stream that history keeps for good (the cache's sink)
        self.device = torch.device(device)
        self.sampling = bundle.sampling
        self.timesteps = self.sampling.timesteps
        # how a block steps from noise to its clean estimate (models/schedule.py), chosen once
        self.sampler = make_sampler(self.sampling, self.dit.config.prediction)
        self.sessions: dict[int, SessionTensors] = {}
        self.text_cache: OrderedDict = OrderedDict()  # (prompt or tensor id) -> (TextKV, tensor), bounded LRU
        self.rope_cache: OrderedDict = OrderedDict()  # frame positions -> (cos, sin); a block reuses its own
        # What is special about the model (models/adapter.py), configured with the engine's model options: its
        # extra rows (run beside each stream row in the same pass, extra row j in lane j + 1 of the row's pages:
        # pool row page + (j + 1) * lane_stride; see _with_extra_rows) and what happens to a finished block.
        self.adapter = adapter if adapter is not None else bundle.adapter.configure()
        self.lanes = 1 + self.adapter.lanes()
        self.lane_stride = lane_stride
        if self.lanes > 1 and (lane_stride <= 0 or pool.num_pages < self.lanes * lane_stride):
            raise ValueError(f"{self.lanes} cache lanes need a pool of {self.lanes} lanes of {lane_stride} pages; "
                             f"it has {pool.num_pages} rows")
        self.timing = {"denoise": 0.0, "commit": 0.0, "decode": 0.0, "forward": 0.0, "finish_block": 0.0}
        self.forward_calls = 0
        # decode overlapped with the next passes: BlockOutput.frames is then a Future of the frames
        self.decode_worker = DecodeWorker(self.device) if overlap_decode and bundle.decoder is not None else None
        self.parallel = None  # inferix.parallel.Parallel when several ranks run this engine (Engine(parallel=...))
        self.graphs = None  # PassGraphs: steady-state passes captured as CUDA graphs (Engine(cuda_graphs=True))

    # ---- sessions ------------------------------------------------------------------------------
    def add_session(self, sid: int, prompt: str, noise, *, negative_prompt: str = "", init_latents=None,
                    text_embeds: torch.Tensor | None = None, chunks: list | None = None,
                    inputs: dict | None = None) -> None:
        st = SessionTensors(noise=noise, prompt=prompt, negative_prompt=negative_prompt, text_embeds=text_embeds,
                            inputs=dict(inputs or {}))
        if self.bundle.decoder is not None:
            st.decoder_state = self.bundle.decoder.new_stream()
        if init_latents is not None:
            lat = init_latents[0].to(self.device, torch.float32)  # [F, C, h, w]
            bounds = [0]
            for c in chunks or [lat.shape[0]]:
                bounds.append(bounds[-1] + c)
            st.prefill = [lat[a:b] for a, b in zip(bounds, bounds[1:])]
            if st.decoder_state is not None:  # prime a causal decoder so the stream continues the given video
                self.bundle.decoder.decode_block(st.decoder_state, lat[None])
        self.sessions[sid] = st

    def fork(self, src: int, dst: int) -> None:
        s = self.sessions[src]
        self.sessions[dst] = SessionTensors(
            noise=s.noise.clone(), prompt=s.prompt, negative_prompt=s.negative_prompt,
            x=None if s.x is None else s.x.clone(), x0=None if s.x0 is None else s.x0.clone(),
            decoder_state=copy.deepcopy(s.decoder_state), history=OrderedDict(s.history),
            prefill=list(s.prefill), text_embeds=s.text_embeds, inputs=dict(s.inputs))

    def drop(self, sid: int) -> None:
        self.sessions.pop(sid, None)

    def set_prompt(self, sid: int, prompt: str) -> None:
        self.sessions[sid].prompt = prompt
        self.sessions[sid].text_embeds = None

    # ---- conditioning ----------------------------------------------------------------------------
    def text_kv(self, st: SessionTensors, negative: bool = False) -> TextKV:
        if st.text_embeds is not None and not negative:
            key = ("embeds", id(st.text_embeds))
        else:
            key = ("prompt", st.negative_prompt if negative else st.prompt)
        hit = self.text_cache.get(key)
        if hit is None:
            emb = st.text_embeds if key[0] == "embeds" else self.bundle.encode_prompt(key[1])
            with torch.no_grad():
                kv = self.dit.prepare_text(emb.to(self.device))
            if self.parallel is not None:  # sequence parallel: this rank keeps its heads only
                kv = self.parallel.shard_text(kv)
            # an entry keyed by a tensor's id keeps that tensor alive, so the id cannot pass to another tensor (a
            # later session's embeddings or image tokens) while the entry is cached
            self.text_cache[key] = (kv, st.text_embeds if key[0] == "embeds" else None)
            while len(self.text_cache) > 64:
                self.text_cache.popitem(last=False)
            return kv
        self.text_cache.move_to_end(key)
        return hit[0]

    # ---- execution -------------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> tuple[list[BlockOutput], dict]:
        """Run a plan: the blocks it finished, and {sid: exception} for the rows that failed on their own (their
        noise, prompt, or decode): those rows leave their pass and the others go on. A failure of a batched pass
        itself raises."""
        outs, faults = [], {}
        for g in plan.groups:
            outs.extend(self._run_group(g, faults))
        return outs, faults

    def _meta(self, rows, nframes: int, write: bool) -> tuple[PagedMeta, torch.Tensor]:
        B = len(rows)
        maxp = max([len(r.context_pages) for r in rows] + [1])
        bt = torch.zeros(B, maxp, dtype=torch.int32)
        for i, r in enumerate(rows):
            if r.context_pages:
                bt[i, :len(r.context_pages)] = torch.tensor(r.context_pages, dtype=torch.int32)
        ctx = [len(r.context_pages) for r in rows]
        wp = torch.tensor([r.write_pages for r in rows], dtype=torch.int32) if write else None
        if self.positions == "relative":
            qpos = torch.tensor([[len(r.context_pages) + i for i in range(nframes)] for r in rows])
            cache_pos = torch.arange(maxp)[None].expand(B, maxp)
            cos, sin = self._rope(cache_pos)
        else:
            qpos = torch.tensor([[r.frame_start + i for i in range(nframes)] for r in rows])
            cos = sin = None
        meta = PagedMeta(pool=self.pool, block_tables=bt.to(self.device), context_pages=torch.tensor(ctx, dtype=torch.int32).to(self.device),
                         write_pages=None if wp is None else wp.to(self.device), cache_cos=cos, cache_sin=sin,
                         context_pages_list=ctx)
        return meta, qpos  # positions stay on the host: the RoPE cache is keyed by them without a device sync

    def _rope(self, pos: torch.Tensor) -> tuple:
        """cos/sin for frame positions [B, F], cached: every pass of a block (and, with cache-relative
        positions, every block of a stream) asks for the same ones."""
        key = tuple(pos.flatten().tolist()) + pos.shape
        hit = self.rope_cache.get(key)
        if hit is None:
            h, w = self.latent_hw
            ph, pw = self.dit.config.patch_size[1:]
            hit = self.dit.rope_for(pos.to(self.device), h // ph, w // pw)
            self.rope_cache[key] = hit
            while len(self.rope_cache) > 16:
                self.rope_cache.popitem(last=False)
        return hit

    def _forward(self, x, t, rows, meta, qpos, actions, negative=False, kv_only=False):
        texts = [self.text_kv(self.sessions[r.sid], negative) for r in rows]
        ctx = texts[0] if len(texts) == 1 else TextKV.cat(texts)
        rope = self._rope(qpos)
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.graphs is not None:
                def call(x, t, ctx, qpos, meta, actions, rope):
                    return self.dit(x, t, ctx, frame_pos=qpos, meta=meta, backend=self.backend, actions=actions,
                                    rope=rope, kv_only=kv_only)
                full = None if self.keep_frames is None else self.keep_frames - x.shape[1]
                steady = full is not None and min(meta.context_pages_list) >= full
                out = self.graphs(call, x, t, ctx, qpos.to(self.device), meta, actions, rope, kv_only=kv_only,
                                  negative=negative, steady=steady)
            else:
                out = self.dit(x, t, ctx, frame_pos=qpos.to(self.device), meta=meta, backend=self.backend,
                               actions=actions, rope=rope, kv_only=kv_only)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.timing["forward"] += time.perf_counter() - t0
        self.forward_calls += 1
        return out

    def _row_input(self, kind: str, r, shape) -> tuple[torch.Tensor, float]:
        """One row's input and timestep (and its prompt's text K/V, made ready): all that is the row's own."""
        st = self.sessions[r.sid]
        if r.prompt is not None:
            self.set_prompt(r.sid, r.prompt)
        if kind == DENOISE:
            if r.step == 0:
                x = st.noise.initial(r.block, r.gen_start, shape)
            else:
                x = self.sampler.step_input(  # the renoise is drawn only by a sampler that re-noises
                    r.step, st, lambda: st.noise.renoise(r.block, r.step, shape).to(self.device))
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(shape):
                raise ValueError(f"session {r.sid}: noise for block {r.block} must be a tensor of shape "
                                 f"{list(shape)}, got {getattr(x, 'shape', type(x).__name__)}")
            st.x = x = x.to(self.device, torch.float32)
            t = self.timesteps[r.step]
        elif kind == COMMIT:
            x, t = st.x0, self.sampling.context_timestep
        elif kind == PREFILL:
            x, t = st.prefill.pop(0), 0.0  # given frames are clean: timestep 0, as the reference does
            self._remember(st, r.frame_start, x)
        elif kind == RECACHE:
            x = torch.stack([st.history[f] for f in r.context_frames])
            t = self.sampling.context_timestep
        else:
            raise ValueError(f"unknown pass kind {kind!r}")
        self.text_kv(st)
        if kind == DENOISE and self.sampling.guidance_scale != 1.0:
            self.text_kv(st, negative=True)
        return x, t

    def _run_group(self, g, faults: dict) -> list[BlockOutput]:
        n = g.nframes
        shape = (n, self.dit.config.out_dim, *self.latent_hw)  # latent channels (in_dim adds any conditions)
        tic = time.perf_counter()
        rows, xs, ts = [], [], []
        for r in g.rows:
            try:
                x, t = self._row_input(g.kind, r, shape)
            except Exception as e:  # noqa: BLE001 - this row's own failure ends its session only
                faults[r.sid] = e
                continue
            rows.append(r)
            xs.append(x)
            ts.append(t)
        if not rows:
            return []
        x = torch.stack(xs)  # [B, F, C, h, w]
        t = torch.tensor(ts, dtype=torch.float32, device=self.device)[:, None].expand(len(rows), n)
        # the per-frame conditions of the pass, as the model takes them (models/adapter.py: pass_inputs)
        actions = self.adapter.pass_inputs(g.kind, rows, [self.sessions[r.sid] for r in rows], n, self.device)
        if g.kind == RECACHE:
            rows_meta = [dataclasses.replace(r, context_pages=[], context_frames=[]) for r in rows]
            meta, qpos = self._meta(rows_meta, n, write=True)
            if self.positions == "absolute":
                qpos = torch.tensor([r.context_frames for r in rows])
        else:
            meta, qpos = self._meta(rows, n, write=g.kind != DENOISE)
        if self.lanes > 1:
            pred = self._with_extra_rows(g.kind, x, t, rows, meta, qpos, actions)
        else:  # only a denoise pass's prediction is read; the others write K/V (their last layer stops there)
            # CFG parallel: one group of ranks runs the conditional denoise passes, the other the unconditional
            neg = g.kind == DENOISE and self.parallel is not None and self.parallel.runs_uncond
            pred = self._forward(x, t, rows, meta, qpos, actions, negative=neg, kv_only=g.kind != DENOISE)
        outs = []
        if g.kind == DENOISE:
            outs, decode_s = self._after_denoise(rows, x, pred, meta, qpos, actions, t, faults)
            self.timing["denoise"] += time.perf_counter() - tic - decode_s
        else:
            self.timing["commit"] += time.perf_counter() - tic
        return outs

    def _with_extra_rows(self, kind, x, t, rows, meta, qpos, actions):
        """One pass for the rows and the extra rows the model runs beside them: extra row j of every row takes
        the input the adapter gives it and reads and writes lane j + 1 of the row's pages, so PREFILL / COMMIT /
        RECACHE write the extra rows' K/V into their lanes too. A DENOISE step returns, per row, the prediction
        the adapter combines from the row's own and its extra rows'."""
        B, S = len(rows), self.lane_stride
        extra = self.adapter.extra_rows(x, actions)
        L = 1 + len(extra)
        xs = torch.cat([x] + [xj for xj, _ in extra])
        acts = None if actions is None else torch.cat([actions] + [aj for _, aj in extra])
        rep = lambda v: None if v is None else torch.cat([v] * L)  # noqa: E731
        lanes = PagedMeta(pool=meta.pool, block_tables=torch.cat([meta.block_tables + j * S for j in range(L)]),
                          context_pages=rep(meta.context_pages),
                          write_pages=None if meta.write_pages is None else torch.cat(
                              [meta.write_pages + j * S for j in range(L)]),
                          cache_cos=rep(meta.cache_cos), cache_sin=rep(meta.cache_sin),
                          context_pages_list=list(meta.context_pages_list) * L)
        out = self._forward(xs, rep(t), rows * L, lanes, qpos.repeat(L, 1), acts, kv_only=kind != DENOISE)
        if kind != DENOISE:
            return None
        return self.adapter.combine(out[:B], [out[(j + 1) * B:(j + 2) * B] for j in range(L - 1)])

    def _after_denoise(self, rows, x, pred, meta, qpos, actions, t, faults) -> tuple[list[BlockOutput], float]:
        decode_s = 0.0
        pred_u = None
        if self.sampler.guided:  # classifier-free guidance: the unconditional prediction too
            if self.parallel is not None and self.parallel.cfg:
                pred, pred_u = self.parallel.cfg_exchange(pred)  # each group ran one of the two passes
            else:
                pred_u = self._forward(x, t, rows, meta_without_write(meta), qpos, actions, negative=True)
        out = self.sampler.output(x, pred, pred_u, [r.step for r in rows])
        outs = []
        for i, r in enumerate(rows):
            self.sampler.advance(self.sessions[r.sid], r.step, x[i], out[i], r.last_step)
        idx = [i for i, r in enumerate(rows) if r.last_step]
        done = [rows[i] for i in idx]
        if done:  # what the model does to its finished blocks before they are committed (models/adapter.py)
            tic = time.perf_counter()
            sts = [self.sessions[r.sid] for r in done]
            fixed = self.adapter.finish_block([st.x0 for st in sts],
                                              [st.history.get(r.frame_start - 1) for st, r in zip(sts, done)],
                                              actions[idx] if torch.is_tensor(actions) else None)
            for st, x0 in zip(sts, fixed):
                st.x0 = x0
            self.timing["finish_block"] += time.perf_counter() - tic
        for r in done:
            st = self.sessions[r.sid]
            for j in range(r.nframes):
                self._remember(st, r.frame_start + j, st.x0[j])
            frames, dt = None, 0.0
            if self.decode_worker is not None:
                frames = self.decode_worker.submit(self.bundle.decoder.decode_block, st.decoder_state, st.x0[None])
            elif self.bundle.decoder is not None:
                tic = time.perf_counter()
                try:
                    frames = self.bundle.decoder.decode_block(st.decoder_state, st.x0[None])
                except Exception as e:  # noqa: BLE001 - one stream's decoder state is its own
                    faults[r.sid] = e
                    continue
                finally:
                    dt = time.perf_counter() - tic
                    decode_s += dt
                    self.timing["decode"] += dt
            outs.append(BlockOutput(r.sid, r.block, frames, st.x0.clone(), dt))
        return outs, decode_s

    def _remember(self, st: SessionTensors, frame: int, latent: torch.Tensor) -> None:
        if latent.dim() == 4:
            for j in range(latent.shape[0]):
                self._remember(st, frame + j, latent[j])
            return
        st.history[frame] = latent
        if self.keep_frames is not None:  # the cache's sink+window rule, with the whole window past the sink: every
            keep = set(kept_frames(st.history, self.keep_sink, self.keep_frames))  # frame a recache may re-commit
            for f in [f for f in st.history if f not in keep]:
                del st.history[f]


def meta_without_write(meta: PagedMeta) -> PagedMeta:
    return PagedMeta(pool=meta.pool, block_tables=meta.block_tables, context_pages=meta.context_pages,
                     write_pages=None, cache_cos=meta.cache_cos, cache_sin=meta.cache_sin,
                     context_pages_list=meta.context_pages_list)
