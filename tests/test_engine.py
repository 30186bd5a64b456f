"""Engine behaviour: incremental equals full, bounded streaming, batching, determinism, controls, errors."""
import dataclasses

import numpy as np
import pytest
import torch

from inferix.engine import AdmissionError, Engine
from inferix.kernels.attention import BlockCausalMeta, ReferenceBackend
from inferix.models.schedule import flow_to_x0
from inferix.plan import COMMIT, DENOISE, PREFILL, RECACHE
from engine_utils import run_latents, tiny_bundle, tiny_engine


class RecordingReference(ReferenceBackend):
    """The naive reference attention, keeping what each layer would cache: its keys (rotated) and values."""

    def __init__(self):
        self.kv = {}

    def attend(self, q, k, v, layer, meta, k_raw=None):
        self.kv[layer] = (k[0].clone(), v[0].clone())
        return super().attend(q, k, v, layer, meta, k_raw=k_raw)


def _pages_kv(eng, pages) -> list:
    """K/V of the pool's pages (in order), every layer: [(k, v)] of [n * page_tokens, H, D] each."""
    idx = torch.tensor(pages)
    return [(eng.pool.k[i][idx].flatten(0, 1).clone(), eng.pool.v[i][idx].flatten(0, 1).clone())
            for i in range(len(eng.pool.k))]


def _assert_kv(got: list, want: dict):
    assert len(got) == len(want)
    for layer, (k, v) in enumerate(got):
        torch.testing.assert_close(k, want[layer][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(v, want[layer][1], rtol=0, atol=1e-5)


def _record_passes(engine):
    """Hook recording every denoise pass: (block, step, input x, x0 after the pass)."""
    passes = []

    def hook(plan, outs):
        for row in plan.rows():
            if row.kind == DENOISE:
                st = engine.runner.sessions[row.sid]
                passes.append((row.block, row.step, st.x.clone(), st.x0.clone()))
    engine.hooks.append(hook)
    return passes


def test_incremental_equals_full_block_causal_forward():
    eng = tiny_engine(kv_pages=12)
    passes = _record_passes(eng)
    lat = run_latents(eng, frames=12)  # 4 blocks of 3 latent frames (no decoder: latent = pixel frames)
    assert lat.shape == (12, 16, 4, 4)
    dit = eng.dit
    ctx = eng.bundle.encode_prompt("a red ball")
    sig = eng.runner.sampler.sigmas
    ts = eng.runner.timesteps
    for block, step, x, x0 in passes:
        # whole clip: earlier blocks clean at the context timestep, the last block noisy at this step's timestep
        clip = torch.cat([lat[: 3 * block], x])[None]  # [1, F, C, H, W]
        t = torch.tensor([[0.0] * (3 * block) + [ts[step]] * 3])
        meta = BlockCausalMeta(frame_tokens=dit.tokens_per_frame(4, 4), block_frames=3)
        with torch.no_grad():
            v = dit(clip, t, ctx, meta=meta, backend=ReferenceBackend())
        x0_full = flow_to_x0(x, v[0, 3 * block:], sig[step])
        assert (x0_full - x0).abs().max() <= 1e-5, (block, step)
    assert len(passes) == 16


@pytest.mark.parametrize("cache_rope", [False, True])
def test_commit_pass_writes_the_same_kv_without_its_last_layer(cache_rope):
    # kv_only (a commit pass) must leave every layer's pages exactly as a full pass leaves them, return nothing
    # and skip what follows the last layer's write (its attention, cross-attention, FFN and the head).
    from inferix.kernels.attention import KVPool, PagedMeta, SDPABackend
    dit = tiny_bundle(3).dit
    cfg, T = dit.config, dit.tokens_per_frame(32, 32)
    ctx = torch.randn(2, 8, cfg.text_dim)
    x = torch.randn(2, 3, cfg.in_dim, 32, 32)
    ph, pw = cfg.patch_size[1:]
    context = [torch.randn(2, T, cfg.num_heads, cfg.head_dim) for _ in range(2 * cfg.num_layers)]
    pools = []
    calls = []
    hook = dit.blocks[-1].ffn.register_forward_hook(lambda *a: calls.append(1))
    for kv_only in (False, True):
        pool = KVPool.allocate(cfg.num_layers, 8, T, cfg.num_heads, cfg.head_dim)
        for t, c in zip(pool.k + pool.v, context):  # two context pages, the same in both passes
            t[:2] = c
        cos = sin = None
        if cache_rope:
            cos, sin = dit.rope_for(torch.arange(2)[None].expand(2, 2), 32 // ph, 32 // pw)
        meta = PagedMeta(pool=pool, block_tables=torch.tensor([[0, 1], [1, 0]], dtype=torch.int32),
                         context_pages=torch.tensor([2, 2], dtype=torch.int32),
                         write_pages=torch.tensor([[2, 3, 4], [5, 6, 7]], dtype=torch.int32), cache_cos=cos,
                         cache_sin=sin)
        calls.clear()
        with torch.no_grad():
            out = dit(x, torch.zeros(2, 3), ctx, frame_pos=torch.tensor([[2, 3, 4]] * 2), meta=meta,
                      backend=SDPABackend(), kv_only=kv_only)
        assert (out is None) == kv_only and len(calls) == (0 if kv_only else 1)
        pools.append(pool)
    hook.remove()
    for a, b in zip(pools[0].k + pools[0].v, pools[1].k + pools[1].v):
        assert torch.equal(a, b)
    assert pools[0].k[-1][2:8].abs().sum() > 0  # the last layer's pages were written
    with pytest.raises(ValueError, match="write_pages"):
        SDPABackend().write_kv(x, x, 0, dataclasses.replace(meta, write_pages=None))


def test_incremental_equals_full_with_window_and_sink():
    W, S = 7, 1  # window of 7 latent frames incl. the current block, first frame pinned
    eng = tiny_engine(window=W, sink=S, kv_pages=W, positions="absolute")
    passes = _record_passes(eng)
    lat = run_latents(eng, frames=15)
    dit = eng.dit
    ctx = eng.bundle.encode_prompt("a red ball")
    T = dit.tokens_per_frame(4, 4)
    for block, step, x, x0 in passes:
        n = 3 * block + 3
        clip = torch.cat([lat[: 3 * block], x])[None]
        t = torch.tensor([[0.0] * (3 * block) + [eng.runner.timesteps[step]] * 3])
        # naive mask: every block sees the sink frames, the (W - 3 - S) frames before it, and itself; this is
        # also what each earlier block saw when its K/V were committed
        def visible(b):
            return set(range(min(S, 3 * b))) | set(range(max(S, 3 * b - (W - 3 - S)), 3 * b)) | set(range(3 * b, 3 * b + 3))
        frame_mask = torch.tensor([[fk in visible(fq // 3) for fk in range(n)] for fq in range(n)])
        mask = frame_mask.repeat_interleave(T, 0).repeat_interleave(T, 1)
        backend = ReferenceBackend()
        backend_masked = backend.masked

        class Masked(ReferenceBackend):
            def attend(self, q, k, v, layer, meta, k_raw=None):
                return backend_masked(q, k, v, mask)
        with torch.no_grad():
            v = dit(clip, t, ctx, backend=Masked())
        x0_full = flow_to_x0(x, v[0, 3 * block:], eng.runner.sampler.sigmas[step])
        assert (x0_full - x0).abs().max() <= 1e-5, (block, step)


def test_long_stream_keeps_pool_bounded_and_frees_every_page():
    W, S = 9, 3
    eng = tiny_engine(window=W, sink=S, kv_pages=W, latent=2)
    used = []
    eng.hooks.append(lambda plan, outs: used.append(eng.kv.pages_in_use))
    s = eng.open_session("endless", num_frames=334 * 3, seed=1)  # 1,002 latent frames, 334 blocks
    n = sum(1 for _ in s)
    assert n == 334
    assert max(used) <= W
    assert eng.pages_in_use == 0 and eng.kv.reserved == 0
    # cache-relative positions stay bounded however long the stream runs
    assert eng.positions == "relative"
    assert s.status == "finished"


def test_relative_positions_equal_absolute_before_eviction():
    a = run_latents(tiny_engine(window=12, kv_pages=12, positions="absolute"), frames=9)
    r = run_latents(tiny_engine(window=12, kv_pages=12, positions="relative"), frames=9)
    assert (a - r).abs().max() <= 1e-5
    # without a sink every key shifts by the same amount and RoPE only sees differences: identical outputs
    a = run_latents(tiny_engine(window=6, kv_pages=6, positions="absolute"), frames=12)
    r = run_latents(tiny_engine(window=6, kv_pages=6, positions="relative"), frames=12)
    assert (a - r).abs().max() <= 1e-5
    # with a sink, once frames are evicted the sink sits closer to the query under relative positions
    a = run_latents(tiny_engine(window=7, sink=1, kv_pages=7, positions="absolute"), frames=15)
    r = run_latents(tiny_engine(window=7, sink=1, kv_pages=7, positions="relative"), frames=15)
    assert (a[:6] - r[:6]).abs().max() <= 1e-5  # blocks 0-1 see no eviction yet
    assert (a[6:] - r[6:]).abs().max() > 1e-4


def test_batched_sessions_equal_sessions_alone():
    prompts = [("a red ball", 3), ("snowy night", 4), ("forest", 5)]
    alone = [run_latents(tiny_engine(), p, frames=9, seed=s) for p, s in prompts]
    eng = tiny_engine()
    batch_sizes = []
    eng.hooks.append(lambda plan, outs: batch_sizes.extend(len(g.rows) for g in plan.groups))
    sess = [eng.open_session(p, num_frames=9, seed=s) for p, s in prompts]
    eng.run_until_idle()
    assert max(batch_sizes) == 3  # really batched
    for s, ref in zip(sess, alone):
        assert (torch.cat(s.latents) - ref).abs().max() <= 1e-5


def test_seed_reproduces_and_differs():
    a = run_latents(tiny_engine(), frames=6, seed=7)
    b = run_latents(tiny_engine(), frames=6, seed=7)
    c = run_latents(tiny_engine(), frames=6, seed=8)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


def test_prompt_switch_takes_effect_at_next_block_and_recache_runs():
    base = run_latents(tiny_engine(), "a red ball", frames=9, seed=0)
    eng = tiny_engine()
    kinds, commits, recached = [], [], []

    def hook(plan, outs):  # the K/V each commit and recache pass leaves in its pages
        kinds.extend(g.kind for g in plan.groups)
        for row in plan.rows():
            if row.kind in (COMMIT, RECACHE):
                (recached if row.kind == RECACHE else commits).append((row, _pages_kv(eng, row.write_pages)))
    eng.hooks.append(hook)
    s = eng.open_session("a red ball", num_frames=9, seed=0, recache=True)
    it = iter(s)
    next(it)  # block 0 delivered
    s.set_prompt("a blue cube")
    for _ in it:
        pass
    lat = torch.cat(s.latents)
    assert torch.allclose(lat[:3], base[:3])
    assert (lat[3:] - base[3:]).abs().max() > 1e-3
    assert RECACHE in kinds
    assert eng.pages_in_use == 0
    # content: the recache re-commits the window (block 0's clean frames) under the new prompt, at the context
    # timestep, as one whole forward of those frames would cache them
    (row, got), = recached
    assert row.context_frames == [0, 1, 2] and row.write_pages == commits[0][0].write_pages
    ref = RecordingReference()
    with torch.no_grad():
        eng.dit(lat[:3][None], torch.full((1, 3), eng.bundle.sampling.context_timestep),
                eng.bundle.encode_prompt("a blue cube"), backend=ref)
    _assert_kv(got, ref.kv)
    old = commits[0][1]  # what block 0's commit cached under the old prompt: the later layers' K/V follow it
    assert (got[-1][0] - old[-1][0]).abs().max() > 1e-3


def test_pause_resume_cancel_free_pages_at_once():
    eng = tiny_engine(kv_pages=12)
    s = eng.open_session("x", num_frames=12, seed=0)
    eng.step(); eng.step()
    s.pause()
    assert not eng.step()  # nothing runnable
    s.resume()
    eng.run_until_idle(max_steps=6)
    assert eng.pages_in_use > 0
    s.cancel()
    assert eng.pages_in_use == 0 and s.status == "cancelled"


def test_fork_continues_like_parent_and_shares_pages():
    eng = tiny_engine(kv_pages=24)
    s = eng.open_session("x", num_frames=12, seed=0)
    it = iter(s)
    next(it)
    eng.run_until_idle(max_steps=1)  # commit block 0
    held = eng.pages_in_use
    child = s.fork()
    assert eng.pages_in_use == held  # shared, not copied
    child.resume()
    eng.run_until_idle()
    assert torch.allclose(torch.cat(child.latents), torch.cat(s.latents)[3:], atol=1e-6)
    assert eng.pages_in_use == 0


def test_admission_waits_then_runs_and_refuses_impossible():
    eng = tiny_engine(window=6, kv_pages=6)
    a = eng.open_session("a", num_frames=12, seed=0)
    b = eng.open_session("b", num_frames=6, seed=1)
    assert b.status == "waiting" and b.waiting_position == 0
    eng.run_until_idle()
    assert a.status == "finished" and b.status == "finished"
    eng2 = tiny_engine(window=9, kv_pages=6)
    with pytest.raises(AdmissionError, match="pool has only 6"):
        eng2.open_session("c", num_frames=30)


def test_init_frames_are_prefilled_as_context():
    eng = tiny_engine(kv_pages=24)
    kinds = []
    eng.hooks.append(lambda plan, outs: kinds.extend(g.kind for g in plan.groups))
    from inferix.models.bundle import PixelDecoder
    eng.bundle.decoder = PixelDecoder(16)  # identity codec: lets init frames in without a VAE
    eng.bundle.decoder.encode = lambda f: torch.zeros(1, 4, 16, 4, 4) + 0.5
    prefilled = []
    eng.hooks.append(lambda plan, outs: prefilled.extend(
        (r.frame_start, r.write_pages, _pages_kv(eng, r.write_pages)) for r in plan.rows() if r.kind == PREFILL))
    s = eng.open_session("x", num_frames=6, seed=0, init_frames=np.zeros((4, 32, 32, 3), np.uint8))
    eng.run_until_idle()
    assert kinds.count(PREFILL) == 2  # 4 given frames in blocks of 3: 3 + 1
    lat_with = torch.cat(s.latents)
    plain = run_latents(tiny_engine(), frames=6)
    assert (lat_with - plain).abs().max() > 1e-3
    # content: the prefilled pages hold what one forward of the given latents at timestep 0 caches, with
    # block-causal attention over the prefill chunks (frames 0-2, then frame 3 seeing 0-3)
    assert [(f, len(p)) for f, p, _ in prefilled] == [(0, 3), (3, 1)]
    given = torch.zeros(1, 4, 16, 4, 4) + 0.5
    ref = RecordingReference()
    meta = BlockCausalMeta(frame_tokens=eng.dit.tokens_per_frame(4, 4), block_frames=3)
    with torch.no_grad():
        eng.dit(given, torch.zeros(1, 4), eng.bundle.encode_prompt("x"), meta=meta, backend=ref)
    got = [(torch.cat([kv[i][0] for _, _, kv in prefilled]), torch.cat([kv[i][1] for _, _, kv in prefilled]))
           for i in range(len(eng.pool.k))]
    _assert_kv(got, ref.kv)


@pytest.mark.parametrize("kw,err,match", [
    (dict(height=60), ValueError, "multiple of 16"),
    (dict(width=0), ValueError, "multiple of 16"),
])
def test_bad_resolution(kw, err, match):
    with pytest.raises(err, match=match):
        Engine(tiny_bundle(), **kw)


def test_bad_session_input():
    eng = tiny_engine()
    with pytest.raises(ValueError, match="num_frames"):
        eng.open_session("x", num_frames=0)
    with pytest.raises(TypeError, match="prompt must be a str"):
        eng.open_session(42, num_frames=3)
    with pytest.raises(FileNotFoundError, match="unknown model 'nope'"):
        Engine.from_pretrained("nope", device="cpu")
    assert eng.pages_in_use == 0


def test_failed_step_releases_pages():
    eng = tiny_engine()
    s = eng.open_session("x", num_frames=9, seed=0)
    eng.step()

    def boom(plan, outs):
        raise RuntimeError("device lost")
    eng.hooks.append(boom)
    with pytest.raises(RuntimeError, match="device lost"):
        eng.step()
    eng.hooks.clear()
    assert s.status == "failed" and eng.pages_in_use == 0 and eng.kv.reserved == 0


def test_euler_sampler_with_classifier_free_guidance():
    from inferix.models.schedule import SamplingConfig
    plain = tiny_engine(sampling=SamplingConfig(denoising_steps=[0] * 6, sampler="euler", warp=False, shift=3.0))
    a = run_latents(plain, frames=6)
    guided = tiny_engine(sampling=SamplingConfig(denoising_steps=[0] * 6, sampler="euler", warp=False, shift=3.0,
                                                 guidance_scale=4.0, negative_prompt="blurry"))
    b = run_latents(guided, frames=6)
    assert plain.runner.forward_calls == 2 * (6 + 1)  # 2 blocks x (6 steps + commit)
    assert guided.runner.forward_calls == 2 * (2 * 6 + 1)  # an unconditional pass per step
    assert torch.isfinite(b).all() and (a - b).abs().max() > 1e-3


def test_guided_step_combines_two_direct_predictions():
    """One Euler step with classifier-free guidance, against two direct DiT calls: the step steps with
    uncond + g * (cond - uncond)."""
    from inferix.models.schedule import SamplingConfig
    g = 4.0
    sampling = SamplingConfig(denoising_steps=[0] * 4, sampler="euler", warp=False, shift=3.0, guidance_scale=g,
                              negative_prompt="blurry")
    eng = tiny_engine(sampling=sampling)
    states = []  # (step, x, x0) of block 0 after each of its denoise passes
    eng.hooks.append(lambda plan, outs: states.extend(
        (r.step, eng.runner.sessions[r.sid].x.clone(), eng.runner.sessions[r.sid].x0.clone())
        for r in plan.rows() if r.kind == DENOISE and r.block == 0))
    run_latents(eng, "a red ball", frames=3)
    assert [st for st, _, _ in states] == [0, 1, 2, 3]
    sig = sampling.euler_sigmas()
    for step in (1, 2):  # block 0 sees no context: a direct call on its frames alone is the engine's pass
        x_in = states[step - 1][1]  # the Euler sampler's next input is the step it took
        t = torch.full((1, 3), sampling.timesteps[step])
        with torch.no_grad():
            cond = eng.dit(x_in[None], t, eng.bundle.encode_prompt("a red ball"))[0]
            uncond = eng.dit(x_in[None], t, eng.bundle.encode_prompt("blurry"))[0]
        v = uncond + g * (cond - uncond)
        _, x_out, x0 = states[step]
        torch.testing.assert_close(x_out, x_in + (sig[step + 1] - sig[step]) * v, rtol=0, atol=1e-5)
        torch.testing.assert_close(x0, x_in - sig[step] * v, rtol=0, atol=1e-5)
        assert (cond - uncond).abs().max() > 1e-2  # the two predictions differ: the guidance matters here


def test_tiny_preset_video_continuation_and_prompt_schedule():
    eng = Engine.from_pretrained("tiny", device="cpu", max_sessions=1, kv_pages=12)
    kinds = []
    eng.hooks.append(lambda plan, outs: kinds.extend((g.kind, g.rows[0].prompt) for g in plan.groups))
    start = (np.random.default_rng(0).random((5, 64, 64, 3)) * 255).astype(np.uint8)  # 5 frames -> 2 latent frames
    blocks = list(eng.generate("a red ball", num_frames=17, seed=0, init_frames=start,
                               prompt_schedule=[(0, "a red ball"), (9, "a blue cube")]))
    frames = np.concatenate(blocks)
    assert frames.shape == (17, 64, 64, 3) and frames.dtype == np.uint8
    # the stream continues the given video: every generated block is a continuation (12 pixel frames per block,
    # not the 9 of a stream's first block), because the decoder was primed with the given frames
    assert [len(b) for b in blocks] == [12, 5]
    assert [k for k, _ in kinds].count(PREFILL) == 1
    assert ("denoise", "a blue cube") in kinds  # the switch reached the runner at a block boundary
    assert eng.pages_in_use == 0
    with pytest.raises(ValueError, match="init_frames are 32x32"):
        eng.open_session("x", num_frames=5, init_frames=np.zeros((5, 32, 32, 3), np.uint8))
    assert eng.pages_in_use == 0


def test_independent_first_frame_blocks_and_full_forward_equivalence():
    from inferix.models.schedule import SamplingConfig
    eng = tiny_engine(sampling=SamplingConfig(independent_first_frame=True), kv_pages=12)
    passes = _record_passes(eng)
    lat = run_latents(eng, frames=7)
    assert lat.shape[0] == 7
    sizes = [x.shape[0] for b, s, x, _ in passes if s == 0]
    assert sizes == [1, 3, 3]
    dit, ctx, T = eng.dit, eng.bundle.encode_prompt("a red ball"), eng.dit.tokens_per_frame(4, 4)
    starts = [0, 1, 4]
    for block, step, x, x0 in passes:
        s0, n = starts[block], x.shape[0]
        clip = torch.cat([lat[:s0], x])[None]
        t = torch.tensor([[0.0] * s0 + [eng.runner.timesteps[step]] * n])
        blk_of = torch.tensor([0] + [1] * 3 + [2] * 3)[: s0 + n].repeat_interleave(T)
        mask = blk_of[None, :] <= blk_of[:, None]

        class Masked(ReferenceBackend):
            def attend(self, q, k, v, layer, meta, k_raw=None):
                return self.masked(q, k, v, mask)
        with torch.no_grad():
            v = dit(clip, t, ctx, backend=Masked())
        assert (flow_to_x0(x, v[0, s0:], eng.runner.sampler.sigmas[step]) - x0).abs().max() <= 1e-5


def test_exact_pixel_frame_count_and_ended_sessions_are_forgotten():
    eng = Engine.from_pretrained("tiny", device="cpu", max_sessions=1, kv_pages=6)
    for n in (1, 10, 14):  # the Wan VAE makes 1 + 4k frames; other counts are made and trimmed, never short
        frames = np.concatenate(list(eng.generate("x", num_frames=n, seed=0)))
        assert frames.shape[0] == n
    assert not eng.sessions and not eng.scheduler.seqs and not eng.runner.sessions
    assert not eng.profiler.opened and eng.pages_in_use == 0


def test_block_boundary_flag_and_fork_of_ended_session():
    eng = tiny_engine(kv_pages=24)
    s = eng.open_session("x", num_frames=6, seed=0)
    assert s.at_block_boundary
    eng.step()
    assert not s.at_block_boundary
    eng.run_until_idle(max_steps=3)  # 4 denoise steps done, commit pending
    assert not s.at_block_boundary
    eng.step()  # commit
    assert s.at_block_boundary
    eng.run_until_idle()
    assert s.status == "finished"
    with pytest.raises(RuntimeError, match="has ended"):
        s.fork()


def test_a_fork_keeps_an_action_set_just_before_it():
    from engine_utils import tiny_engine
    eng = tiny_engine(window=6, kv_pages=24, num_actions=3)
    s = eng.open_session("a red ball", num_frames=None, seed=0)
    while eng.runner.forward_calls < 5 or not s.at_block_boundary:
        eng.step()
    s.act(2)  # pending until the next block boundary
    child = s.fork()
    assert child._s.pending_action == 2 == s._s.pending_action
    assert child._s.action_plan is not s._s.action_plan and child._s.prompt_plan is not s._s.prompt_plan
