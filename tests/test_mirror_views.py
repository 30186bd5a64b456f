"""Mirror views: the toy world's mirror images, and the engine and the standalone rollout averaging them."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from inferix.models.schedule import SamplingConfig
from inferix.models.mirrors import mirror_tensor
from inferix.models.toyworld import simulator as sim
from inferix.models.toyworld.data import to_latent, to_pixels
from inferix.models.toyworld.eval import RolloutMeta, WindowKVBackend, load_decoder, load_toyworld, rollout
from inferix.models.toyworld.metrics import detect_color

from toyworld_helpers import WEIGHTS


def test_mirror_images_are_worlds_of_the_same_kind():
    """Each mirror of an episode, played with the mirrored actions, obeys the simulator's rules: the agent sits where
    the mirrored true position says and moves 2 px per frame in the mirrored action's direction, stopped by the
    same wall; the scene stays on the 4-px grid and the agent on the 2-px lattice. The half turn and the diagonal
    mirrors keep the checker's shades where the simulator puts them; the left-right and top-bottom ones swap them."""
    acts = sim.random_actions(np.random.default_rng(4), 120)
    frames, pos, bg = sim.simulate(4, acts, "desert", 120, return_background=True)
    lo, hi = sim.WALL + sim.AGENT_SIZE / 2, sim.SIZE - sim.WALL - sim.AGENT_SIZE / 2  # agent centre bounds
    floor = np.zeros((sim.SIZE, sim.SIZE), bool)
    floor[sim.WALL:-sim.WALL, sim.WALL:-sim.WALL] = True
    yy, xx = np.mgrid[0:sim.SIZE, 0:sim.SIZE]
    tile = ((yy // sim.TILE + xx // sim.TILE) % 2 == 1) & floor  # where the simulator draws the second shade
    pal = sim.THEMES["desert"]
    assert set(sim.MIRRORS) == {"h", "v", "hv", "d", "a"}
    for name, (axes, transpose, perm) in sim.MIRRORS.items():
        f, a = sim.mirror_frames(frames, name), sim.mirror_actions(acts, name)
        assert np.array_equal(sim.mirror_frames(f, name), frames) and np.array_equal(sim.mirror_actions(a, name), acts)
        # the engine's tensor version (channels first) is the same image
        t = torch.from_numpy(np.ascontiguousarray(frames[:3])).permute(0, 3, 1, 2)
        assert np.array_equal(mirror_tensor(t, name).permute(0, 2, 3, 1).numpy(), f[:3])
        p = pos.copy()
        for ax in axes:  # -1 mirrors x, -2 mirrors y
            p[:, -1 - ax] = sim.SIZE - p[:, -1 - ax]
        if transpose:
            p = p[:, ::-1]
        assert np.allclose(detect_color(f, sim.AGENT_COLOR), p)
        for t in range(1, len(acts)):
            dx, dy = sim.ACTION_DELTAS[int(a[t])]
            want = np.clip(p[t - 1] + sim.AGENT_SPEED * np.array([dx, dy]), lo, hi)
            assert np.array_equal(p[t], want), (name, t)
        assert np.all((p - sim.AGENT_SIZE / 2) % 2 == 0)
        m = sim.mirror_frames(bg, name)
        assert np.array_equal(m, np.repeat(np.repeat(m[::4, ::4], 4, 0), 4, 1))
        shade = np.all(m == pal["tile"], -1)  # the mirrored scene's pixels in the second shade
        assert shade.any() and (not (shade & ~tile).any()) == (name in ("hv", "d", "a")), name
    assert np.array_equal(sim.mirror_frames(frames, "hv"), sim.mirror_frames(sim.mirror_frames(frames, "h"), "v"))
    assert np.array_equal(sim.mirror_frames(frames, "a"), sim.mirror_frames(sim.mirror_frames(frames, "hv"), "d"))
    with pytest.raises(ValueError, match="unknown mirror 'r90'"):
        sim.mirror_frames(frames, "r90")


def test_rollout_with_mirror_views_averages_each_block():
    """rollout(mirrors=...) against a plain loop: one cache per view, each fed the mirrored start frames, noise and
    actions; each block the views' estimates are mapped back and averaged, and every view commits the mean."""
    dit, text, meta = load_toyworld(WEIGHTS)
    sampling = SamplingConfig.from_dict(meta["sampling"])
    acts = sim.random_actions(np.random.default_rng(6), 20)
    frames, _ = sim.simulate(6, acts, "night", 20)
    mirrors = ("h", "a")
    kw = dict(seed=2, window=16, sink=8, init_actions=acts[:8], positions="absolute")
    got = np.concatenate(list(rollout(dit, text, sampling, "night", frames[:8], acts[8:], mirrors=mirrors, **kw)))
    plain = np.concatenate(list(rollout(dit, text, sampling, "night", frames[:8], acts[8:], **kw)))

    # written out here: the image maps and the action ids (none, up, down, left, right) of each view
    views = [(lambda x: x, [0, 1, 2, 3, 4]), (lambda x: x.flip(-1), [0, 1, 2, 4, 3]),
             (lambda x: x.flip(-1).flip(-2).transpose(-1, -2), [0, 4, 3, 2, 1])]
    ctx = dit.prepare_text(text.encode("night"))
    caches = [WindowKVBackend(dit.config.num_layers, 64, 16, 8, 4) for _ in views]
    g = torch.Generator().manual_seed(2)
    out = []
    with torch.no_grad():
        def run(x, t, f0, a, commit, i):
            look, perm = views[i]
            return dit(look(x), torch.full((1, 4), t), ctx, frame_pos=torch.arange(f0, f0 + 4)[None],
                       meta=RolloutMeta(commit), backend=caches[i],
                       actions=torch.tensor([[perm[int(v)] for v in a]]))
        for b in (0, 4):
            for i in range(len(views)):
                run(to_latent(frames[b:b + 4])[None], 0.0, b, acts[b:b + 4], True, i)
        for b in (8, 12, 16):
            x = torch.randn((1, 4, 3, 64, 64), generator=g)
            est = [views[i][0](run(x, 1000.0, b, acts[b:b + 4], False, i)) for i in range(len(views))]
            x0 = (sum(est) / len(est)).clamp(-1, 1)
            for i in range(len(views)):
                run(x0, 0.0, b, acts[b:b + 4], True, i)
            out.append(to_pixels(x0[0]))
    want = np.concatenate(out)
    assert got.shape == want.shape == (12, 64, 64, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert np.abs(got.astype(int) - plain.astype(int)).mean() > 0.1  # the views do change the frames
    with pytest.raises(ValueError, match="mirrors must be distinct"):
        next(rollout(dit, text, sampling, "night", frames[:8], acts[8:], mirrors=("h", "h"), **kw))


@pytest.mark.slow
def test_engine_mirror_views_give_the_engine_free_frames_and_fork_with_the_stream():
    from inferix.engine import Engine
    from inferix.models.toyworld.adapter import mirror_views
    meta = json.loads(WEIGHTS.read_text())
    acts = sim.random_actions(np.random.default_rng(5), 40)
    frames, _ = sim.simulate(5, acts, "desert", 40)
    mirrors = ("v", "d", "a")
    eng = Engine.from_pretrained("toyworld", device="cpu", max_sessions=2, mirrors=mirrors)
    # 8 blocks after 8 start frames: the views' caches drop frames like the pages from the third block on.
    want = np.concatenate(list(eng.generate("a cube in the desert", num_frames=32, seed=3, init_frames=frames[:8],
                                            actions=[int(a) for a in acts[8:]])))
    dit, text, _ = load_toyworld(WEIGHTS)
    got = np.concatenate(list(rollout(dit, text, SamplingConfig.from_dict(meta["sampling"]), "a cube in the desert",
                                      frames[:8], acts[8:], seed=3, window=meta["window"], sink=meta["sink"],
                                      decoder=load_decoder(WEIGHTS, meta), positions="relative", mirrors=mirrors)))
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    # A fork shares the stream's pages, the views' lanes with them: a stream goes on as if it had never been forked,
    # whatever its fork does, and the fork goes on as the stream would with the fork's actions.
    def run(turn, fork_turn=None):
        s = eng.open_session("a cube at night", num_frames=24, seed=1, init_frames=frames[:8])
        s.act("left")
        first = next(iter(s))
        eng.run_until_idle(max_steps=1)  # commit the first block
        f = None
        if fork_turn:
            f = s.fork()
            f.resume()
            f.act(fork_turn)
        s.act(turn)
        eng.run_until_idle()
        return np.concatenate([first] + s.poll()), None if f is None else np.concatenate([first] + f.poll())
    down, up = run("down")[0], run("up")[0]
    a, b = run("down", "up")
    assert len(a) == 24 and np.array_equal(a, down) and np.array_equal(b, up) and not np.array_equal(down, up)
    # The names are checked, and so is the model.
    with pytest.raises(ValueError, match="mirrors must be distinct"):
        Engine.from_pretrained("toyworld", device="cpu", mirrors=("x",))
    # Without a window the session keeps every frame in its pages, the views' lanes with them.
    full = Engine.from_pretrained("toyworld", device="cpu", window=None, max_sessions=1, kv_pages=16, mirrors=("h",))
    s = full.open_session("a cube in the desert", num_frames=8, seed=0, init_frames=frames[:8])
    assert sum(len(b) for b in s) == 8 and full.kv.sessions == {} and full.pages_in_use == 0
    wide = dataclasses.replace(eng.bundle, width=96)
    assert mirror_views(wide, ("h", "hv"))[1] == ("hv", [0, 2, 1, 4, 3])
    with pytest.raises(ValueError, match=r"mirrors \['d', 'a'\] transpose the frame, which needs a square one"):
        mirror_views(wide, ("h", "d", "a"))


@pytest.mark.slow
def test_engine_mirror_views_rebuild_their_cache_on_a_recached_prompt_switch():
    """A prompt switch with re-caching rewrites every lane of the window's pages: the views' K/V too, so nothing
    of the old prompt's is left in them."""
    from inferix.engine import Engine
    from inferix.plan import RECACHE
    frames, _ = sim.simulate(2, None, "snow", 8)
    eng = Engine.from_pretrained("toyworld", device="cpu", max_sessions=1, mirrors=("hv",))
    S = eng.kv.alloc.num_pages
    seen, before = [], [eng.pool.k[-1].clone()]  # the last layer: its keys depend on the prompt

    def hook(plan, outs):
        now = eng.pool.k[-1]
        for g in plan.groups:
            if g.kind == RECACHE:
                for r in g.rows:  # (pages written, how many of them changed in each lane)
                    changed = [int(sum(not torch.equal(now[p + j * S], before[0][p + j * S]) for p in r.write_pages))
                               for j in range(2)]
                    seen.append((len(r.write_pages), changed))
        before[0] = now.clone()
    eng.hooks.append(hook)
    s = eng.open_session("a red cube in a snowy field", num_frames=24, seed=0, init_frames=frames, recache=True)
    it = iter(s)
    out = [next(it) for _ in range(3)]  # the window is full: pages have been evicted and reused
    s.set_prompt("a cube at night")
    out += list(it)
    assert seen and all(n > 0 and changed == [n, n] for n, changed in seen), seen
    assert sum(len(b) for b in out) == 24 and eng.pages_in_use == 0
    # Without views too: the re-commit reads the sink frames (0..7) from the runner's history, which keeps them
    # for good even after the stream has outgrown the window (it used to drop them and fail the session).
    plain = Engine.from_pretrained("toyworld", device="cpu", max_sessions=1)
    rows = []
    plain.hooks.append(lambda plan, outs: rows.extend(r for g in plan.groups if g.kind == RECACHE for r in g.rows))
    s = plain.open_session("a red cube in a snowy field", num_frames=24, seed=0, init_frames=frames, recache=True)
    it = iter(s)
    out = [next(it) for _ in range(3)]
    s.set_prompt("a cube at night")
    out += list(it)
    assert rows and rows[0].context_frames[:8] == list(range(8)) and max(rows[0].context_frames) > 16
    assert sum(len(b) for b in out) == 24 and s.status == "finished"


@pytest.mark.slow
def test_views_live_in_the_page_pool_and_run_in_the_streams_passes():
    """Each page holds a frame in every lane (the stream's and each view's K/V), so the pool is lanes times the
    plain one and admission counts the views with the page they belong to: with room for one window, a second
    session waits until the first has finished. The views' rows join the stream's passes: the same number of
    forward calls as without views."""
    from inferix.engine import Engine
    frames, _ = sim.simulate(3, None, "forest", 8)

    def run(mirrors):
        eng = Engine.from_pretrained("toyworld", device="cpu", kv_pages=16, max_sessions=1, mirrors=mirrors)
        s = [eng.open_session("a cube in the forest", num_frames=16, seed=k, init_frames=frames) for k in (0, 1)]
        eng.run_until_idle(max_steps=1)
        waiting = (s[0].status, s[1].status)
        eng.run_until_idle()
        return eng, waiting, [np.concatenate(x.poll()) for x in s]
    eng, waiting, got = run(("hv", "d"))
    plain, plain_waiting, plain_got = run(())
    sv, sp = eng.profiler.summary(), plain.profiler.summary()
    assert sv["kv_lanes"] == 3 and sp["kv_lanes"] == 1 and sv["model_options"] == {"mirrors": ["hv", "d"], "corrector": False}
    assert eng.pool.num_pages == 3 * 16 and sv["kv_pool_mib"] == 3 * sp["kv_pool_mib"]
    assert waiting == plain_waiting == ("running", "waiting")
    assert sv["kv_pages_max_in_use"] == sp["kv_pages_max_in_use"] == 16 and eng.pages_in_use == 0
    assert sv["forward_calls"] == sp["forward_calls"] and "mirror_views_forward" not in sv["time_split_s"]
    assert all(len(g) == 16 for g in got + plain_got) and not np.array_equal(got[0], plain_got[0])


@pytest.mark.slow
def test_views_of_sessions_with_different_context_lengths_read_their_own_lanes():
    """Two sessions with 8 and 4 start frames batched together take the per-row paged path; the naive reference
    attention and SDPA, each reading lane j of every row's pages, give the same frames, and each session gets the
    frames it gets alone."""
    from inferix.engine import Engine
    frames, _ = sim.simulate(4, None, "snow", 8)

    def run(attention, which=(0, 1)):
        eng = Engine.from_pretrained("toyworld", device="cpu", attention=attention, mirrors=("hv", "d"),
                                     max_sessions=2)
        s = {}
        if 0 in which:
            s[0] = eng.open_session("a red cube in a snowy field", num_frames=8, seed=1, init_frames=frames)
        if 1 in which:
            s[1] = eng.open_session("a cube at night", num_frames=4, seed=2, init_frames=frames[:4])
        eng.run_until_idle()
        assert eng.pages_in_use == 0
        return {k: np.concatenate(v.poll()) for k, v in s.items()}
    sdpa, ref = run("sdpa"), run("reference")
    alone = {**run("sdpa", (0,)), **run("sdpa", (1,))}
    for k in (0, 1):
        assert np.abs(sdpa[k].astype(int) - ref[k].astype(int)).max() <= 1
        assert np.abs(sdpa[k].astype(int) - alone[k].astype(int)).max() <= 1
    assert not np.array_equal(sdpa[0][:4], sdpa[1])
