"""Mirror views: the toy world's mirror images, and the engine and the standalone rollout averaging them."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inferix.models.schedule import SamplingConfig
from inferix.models.toyworld import simulator as sim
from inferix.models.toyworld.data import to_latent, to_pixels
from inferix.models.toyworld.eval import RolloutMeta, WindowKVBackend, load_decoder, load_toyworld, rollout
from inferix.models.toyworld.metrics import detect_color

WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights" / "toyworld.json"


@pytest.fixture(autouse=True)
def one_thread():  # as in test_toyworld.py: small tensors, and a busy machine punishes oversubscription
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_mirror_images_are_worlds_of_the_same_kind():
    """Each mirror of an episode, played with the mirrored actions, obeys the simulator's rules: the agent sits where
    the mirrored true position says and moves 2 px per frame in the mirrored action's direction, stopped by the
    same wall; the scene stays on the 4-px grid and the agent on the 2-px lattice."""
    acts = sim.random_actions(np.random.default_rng(4), 120)
    frames, pos, bg = sim.simulate(4, acts, "desert", 120, return_background=True)
    lo, hi = sim.WALL + sim.AGENT_SIZE / 2, sim.SIZE - sim.WALL - sim.AGENT_SIZE / 2  # agent centre bounds
    for name, (axes, perm) in sim.MIRRORS.items():
        f, a = sim.mirror_frames(frames, name), sim.mirror_actions(acts, name)
        assert np.array_equal(sim.mirror_frames(f, name), frames) and np.array_equal(sim.mirror_actions(a, name), acts)
        p = pos.copy()
        for ax in axes:  # -1 mirrors x, -2 mirrors y
            p[:, -1 - ax] = sim.SIZE - p[:, -1 - ax]
        assert np.allclose(detect_color(f, sim.AGENT_COLOR), p)
        for t in range(1, len(acts)):
            dx, dy = sim.ACTION_DELTAS[int(a[t])]
            want = np.clip(p[t - 1] + sim.AGENT_SPEED * np.array([dx, dy]), lo, hi)
            assert np.array_equal(p[t], want), (name, t)
        assert np.all((p - sim.AGENT_SIZE / 2) % 2 == 0)
        m = sim.mirror_frames(bg, name)
        assert np.array_equal(m, np.repeat(np.repeat(m[::4, ::4], 4, 0), 4, 1))
    assert np.array_equal(sim.mirror_frames(frames, "hv"), sim.mirror_frames(sim.mirror_frames(frames, "h"), "v"))
    with pytest.raises(ValueError, match="unknown mirror 'd'"):
        sim.mirror_frames(frames, "d")


def test_rollout_with_mirror_views_averages_each_block():
    """rollout(mirrors=...) against a plain loop: one cache per view, each fed the mirrored start frames, noise and
    actions; each block the views' estimates are mapped back and averaged, and every view commits the mean."""
    dit, text, meta = load_toyworld(WEIGHTS)
    sampling = SamplingConfig.from_dict(meta["sampling"])
    acts = sim.random_actions(np.random.default_rng(6), 20)
    frames, _ = sim.simulate(6, acts, "night", 20)
    mirrors = ("h", "hv")
    kw = dict(seed=2, window=16, sink=8, init_actions=acts[:8], positions="absolute")
    got = np.concatenate(list(rollout(dit, text, sampling, "night", frames[:8], acts[8:], mirrors=mirrors, **kw)))
    plain = np.concatenate(list(rollout(dit, text, sampling, "night", frames[:8], acts[8:], **kw)))

    views = [((), list(range(5)))] + [(sim.MIRRORS[m][0], list(sim.MIRRORS[m][1])) for m in mirrors]
    ctx = dit.prepare_text(text.encode("night"))
    caches = [WindowKVBackend(dit.config.num_layers, 64, 16, 8, 4) for _ in views]
    g = torch.Generator().manual_seed(2)
    flip = lambda x, ax: x.flip(ax) if ax else x  # noqa: E731
    out = []
    with torch.no_grad():
        def run(x, t, f0, a, commit, i):
            ax, perm = views[i]
            return dit(flip(x, ax), torch.full((1, 4), t), ctx, frame_pos=torch.arange(f0, f0 + 4)[None],
                       meta=RolloutMeta(commit), backend=caches[i],
                       actions=torch.tensor([[perm[int(v)] for v in a]]))
        for b in (0, 4):
            for i in range(len(views)):
                run(to_latent(frames[b:b + 4])[None], 0.0, b, acts[b:b + 4], True, i)
        for b in (8, 12, 16):
            x = torch.randn((1, 4, 3, 64, 64), generator=g)
            est = [flip(run(x, 1000.0, b, acts[b:b + 4], False, i), views[i][0]) for i in range(len(views))]
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


def test_engine_mirror_views_give_the_engine_free_frames_and_fork_with_the_stream():
    from inferix.engine import Engine
    meta = json.loads(WEIGHTS.read_text())
    acts = sim.random_actions(np.random.default_rng(5), 40)
    frames, _ = sim.simulate(5, acts, "desert", 40)
    mirrors = ("h", "v", "hv")
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
    # A fork carries its own copy of the views' caches: a stream goes on as if it had never been forked, whatever
    # its fork does, and the fork goes on as the stream would with the fork's actions.
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
    with pytest.raises(ValueError, match="need a window"):
        Engine.from_pretrained("toyworld", device="cpu", window=None, mirrors=("h",))


def test_engine_mirror_views_rebuild_their_cache_on_a_recached_prompt_switch():
    from inferix.engine import Engine
    from inferix.plan import RECACHE
    frames, _ = sim.simulate(2, None, "snow", 8)
    eng = Engine.from_pretrained("toyworld", device="cpu", max_sessions=1, mirrors=("hv",))
    seen = []

    def hook(plan, outs):
        for g in plan.groups:
            if g.kind == RECACHE:
                seen.extend((len(r.context_frames), eng.runner.sessions[r.sid].views.frames_cached())
                            for r in g.rows)
    eng.hooks.append(hook)
    s = eng.open_session("a red cube in a snowy field", num_frames=24, seed=0, init_frames=frames, recache=True)
    it = iter(s)
    out = [next(it) for _ in range(3)]  # the window is full: the views' cache has dropped frames
    s.set_prompt("a cube at night")
    out += list(it)
    # The views' cache holds exactly the window the pages re-committed, no leftovers of the old prompt's K/V.
    assert seen and all(n == v and n > 0 for n, v in seen)
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
