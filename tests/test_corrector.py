"""The action corrector: the module, its place in a bundle, in the engine and the engine-free rollout, its training
and export."""
import json

import numpy as np
import pytest
import torch

from inferix.engine import Engine
from inferix.models.corrector import ActionCorrector
from inferix.models.schedule import SamplingConfig
from inferix.models.toyworld import simulator as sim
from inferix.models.toyworld.corrector_train import CorrectorConfig, episode, export_with_corrector, train_corrector
from inferix.models.toyworld.data import to_latent
from inferix.models.toyworld.eval import load_corrector, load_decoder, load_parts, load_toyworld, rollout
from inferix.app.toyworld.corrector_pairs import collect_pairs
from inferix.app.toyworld.train_corrector import main as corrector_main

from toyworld_helpers import WEIGHTS


def _random_corrector(seed=0, channels=8, layers=3, std=0.05) -> ActionCorrector:
    torch.manual_seed(seed)
    c = ActionCorrector(channels, layers, len(sim.ACTIONS))
    torch.nn.init.normal_(c.out.weight, std=std)  # not the identity it starts as
    return c.eval()


@pytest.fixture(scope="module")
def corrected_bundle(tmp_path_factory):
    """The shipped bundle with a random (non-identity) corrector in place of its own."""
    return export_with_corrector(WEIGHTS, _random_corrector(3, std=0.3), tmp_path_factory.mktemp("corr") / "toyworld.json")


def test_untrained_corrector_is_the_identity_and_rejects_bad_input():
    c = ActionCorrector(8, 3, 5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(c(x, torch.zeros_like(x), torch.tensor([1, 4])), x)
    assert torch.equal(c(x * 3, x, torch.tensor([0, 0])), (x * 3).clamp(-1, 1))  # the output is an image
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        c(torch.zeros(2, 4, 16, 16), torch.zeros(2, 4, 16, 16), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="one action per frame: 2 frames, 1 actions"):
        c(x, x, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"action ids must lie in 0..4"):
        c(x, x, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="layers >= 2"):
        ActionCorrector(8, 1, 5)
    with pytest.raises(ValueError, match="one action per frame: 2 frames .1 streams of 2., 3 actions"):
        c.block(x, None, [0, 1, 2])


def test_block_corrects_frame_by_frame_after_the_frame_before():
    c = _random_corrector(1)
    est = torch.rand(4, 3, 16, 16) * 2 - 1
    prev = torch.rand(3, 16, 16) * 2 - 1
    acts = torch.tensor([1, 1, 3, 0])
    got = c.block(est, prev, acts)
    with torch.no_grad():  # naive: each frame after the corrected one before it; frame 0 after prev
        before, want = prev, []
        for j in range(4):
            one_hot = torch.zeros(5, 16, 16)
            one_hot[acts[j]] = 1
            h = torch.cat([est[j], before, one_hot])[None]
            for conv in c.convs:
                h = torch.nn.functional.gelu(conv(h))
            before = (est[j] + c.out(h)[0]).clamp(-1, 1)
            want.append(before)
    assert torch.allclose(got, torch.stack(want), atol=1e-6)
    assert (got - est.clamp(-1, 1)).abs().max() > 1e-3  # it does change the frames
    # Without a frame before the block, the block's own first estimate stands in for it.
    assert torch.allclose(c.block(est, None, acts), c.block(est, est[0], acts))
    # Several streams at once: each as on its own (the second without a frame before it).
    est2 = torch.rand(3, 4, 3, 16, 16) * 2 - 1
    acts2 = torch.tensor([[1, 1, 3, 0], [4, 4, 2, 2], [0, 3, 3, 1]])
    prevs = [prev, None, est2[0, 0]]
    many = c.blocks(est2, prevs, acts2)
    for i in range(3):
        assert torch.allclose(many[i], c.block(est2[i], prevs[i], acts2[i]), atol=1e-5)
    with pytest.raises(ValueError, match="one prev per stream"):
        c.blocks(est2, prevs[:2], acts2)
    with pytest.raises(ValueError, match="one action per frame"):
        c.blocks(est2, prevs, acts2[:, :3])


def test_engine_and_engine_free_rollout_apply_the_bundles_corrector(corrected_bundle):
    acts = sim.random_actions(np.random.default_rng(4), 32)
    frames, _ = sim.simulate(6, acts, "forest", 32)
    kw = dict(num_frames=24, seed=2, init_frames=frames[:8], actions=[int(a) for a in acts[8:]])
    eng = Engine.from_pretrained(str(corrected_bundle), device="cpu", max_sessions=1)
    assert eng.corrector and eng.bundle.corrector is not None
    got = np.concatenate(list(eng.generate("a cube in the forest", **kw)))
    off = Engine.from_pretrained(str(corrected_bundle), device="cpu", max_sessions=1, corrector=False)
    assert not off.corrector
    plain = np.concatenate(list(off.generate("a cube in the forest", **kw)))
    assert np.abs(got.astype(int) - plain).mean() > 0.5  # the corrector changes what is committed
    dit, text, meta = load_toyworld(corrected_bundle)
    corr = load_corrector(corrected_bundle, meta)
    rkw = dict(seed=2, window=meta["window"], sink=meta["sink"], decoder=load_decoder(corrected_bundle, meta),
               positions="relative")
    free = np.concatenate(list(rollout(dit, text, SamplingConfig.from_dict(meta["sampling"]), "a cube in the forest",
                                       frames[:8], acts[8:], corrector=corr, **rkw)))
    diff = np.abs(free.astype(int) - got)
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    # What the corrector is given: each block's estimate, the frame committed before it (the last start frame for
    # the first block) and the block's actions; what it returns is committed.
    keep = Engine.from_pretrained(str(corrected_bundle), device="cpu", max_sessions=1, keep_latents=True)
    calls = []

    class Recording:
        def blocks(self, est, prevs, actions):
            out = corr.blocks(est, prevs, actions)
            calls.extend(zip(est, prevs, torch.as_tensor(actions), out))
            return out
    keep.adapter.corrector = Recording()
    s = keep.open_session("a cube in the forest", num_frames=8, seed=2, init_frames=frames[:8],
                          actions=[int(a) for a in acts[8:16]])
    keep.run_until_idle()
    assert len(calls) == 2
    assert torch.equal(calls[0][1], to_latent(frames[7])) and torch.equal(calls[1][1], s.latents[0][-1])
    assert [c[2].tolist() for c in calls] == [acts[8:12].tolist(), acts[12:16].tolist()]
    assert all(torch.equal(c[3], lat) for c, lat in zip(calls, s.latents))


def test_sessions_batched_together_are_corrected_in_one_pass_as_each_alone(corrected_bundle):
    acts = sim.random_actions(np.random.default_rng(8), 24)
    frames, _ = sim.simulate(8, acts, "snow", 24)
    kw = [dict(seed=s, init_frames=frames[:8], actions=[int(a) for a in acts[8 + 4 * s:24]]) for s in (0, 1)]
    alone = []
    for k in kw:
        eng = Engine.from_pretrained(str(corrected_bundle), device="cpu", max_sessions=1)
        alone.append(np.concatenate(list(eng.generate("snow", num_frames=8, **k))))
    eng = Engine.from_pretrained(str(corrected_bundle), device="cpu", max_sessions=2)
    sizes, real = [], eng.adapter.corrector.blocks
    eng.adapter.corrector.blocks = lambda est, *a: sizes.append(est.shape[0]) or real(est, *a)
    ss = [eng.open_session("snow", num_frames=8, **k) for k in kw]
    eng.run_until_idle()
    assert sizes == [2, 2]  # both sessions' blocks in each call
    for s, want in zip(ss, alone):
        got = np.concatenate(list(s.blocks))
        diff = np.abs(got.astype(int) - want)
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_corrector_switch_and_bad_bundles(corrected_bundle, tmp_path):
    with pytest.raises(ValueError, match="unknown model option 'corrector' for model 'tiny' \\(it takes: none\\)"):
        Engine.from_pretrained("tiny", device="cpu", corrector=True)
    # Beside mirror views it is off unless asked for (it stands in for them).
    assert not Engine.from_pretrained(str(corrected_bundle), device="cpu", mirrors=("hv",)).corrector
    assert Engine.from_pretrained(str(corrected_bundle), device="cpu", mirrors=("hv",), corrector=True).corrector
    on = Engine.from_pretrained(str(corrected_bundle), device="cpu", model_options={"mirrors": "hv", "corrector": "on"})
    assert on.corrector and on.model_options == {"mirrors": ["hv"], "corrector": True}
    with pytest.raises(ValueError, match="model option corrector: must be auto, on or off, got 'maybe'"):
        Engine.from_pretrained(str(corrected_bundle), device="cpu", model_options={"corrector": "maybe"})
    meta = json.loads(corrected_bundle.read_text())
    bad = tmp_path / "bad.json"
    bad.with_suffix(".safetensors").write_bytes(corrected_bundle.with_suffix(".safetensors").read_bytes())
    bad.write_text(json.dumps({**meta, "corrector": {"type": "action", "channels": 8, "layers": 3, "actions": 4}}))
    with pytest.raises(ValueError, match="takes 4 actions, the DiT 5"):
        Engine.from_pretrained(str(bad), device="cpu")
    bad.write_text(json.dumps({**meta, "corrector": {"type": "action", "channels": 16, "layers": 3, "actions": 5}}))
    with pytest.raises(ValueError, match="corrector"):  # the tensors do not fit: shapes named
        Engine.from_pretrained(str(bad), device="cpu")
    bad.write_text(json.dumps({**meta, "corrector": {"type": "action", "layers": 3}}))
    with pytest.raises(ValueError, match="integer 'channels', 'layers' and 'actions'"):
        Engine.from_pretrained(str(bad), device="cpu")


@pytest.mark.slow
def test_training_learns_a_correction_the_estimate_lacks():
    """Pairs whose estimate is the true frame dimmed and whose target is the true frame: the corrector must end
    well below the uncorrected distance."""
    acts = sim.random_actions(np.random.default_rng(0), 40)
    frames, _ = sim.simulate(3, acts, "meadow", 40)
    true = to_latent(frames).reshape(10, 4, 3, 64, 64)
    pairs = {"est": (0.7 * true).half(), "prev": torch.cat([true[:1, 0], true[:-1, -1]]).half(),
             "act": torch.as_tensor(acts).reshape(10, 4), "mean": true.half()}
    cfg = CorrectorConfig(steps=120, batch=4, channels=8, layers=3, lr=3e-3)
    corr, losses, identity = train_corrector(pairs, cfg, progress=False)
    assert np.mean(losses[-20:]) < 0.3 * np.mean(identity[-20:]), (np.mean(losses[-20:]), np.mean(identity[-20:]))
    again, losses2, _ = train_corrector(pairs, cfg, progress=False)  # reproducible from the seed
    assert losses2 == losses and all(torch.equal(a, b) for a, b in zip(corr.parameters(), again.parameters()))
    with pytest.raises(ValueError, match="pairs must be"):
        train_corrector({**pairs, "act": pairs["act"][:, :3]}, cfg, progress=False)
    with pytest.raises(ValueError, match="at least one mirror view"):
        CorrectorConfig(views="")


@pytest.mark.slow
def test_train_toyworld_corrector_cli_adds_a_corrector_to_the_bundle(tmp_path, capsys):
    out = tmp_path / "c"
    assert corrector_main(["--episodes", "1", "--frames", "8", "--steps", "3", "--batch", "2", "--views", "hv",
                           "--channels", "4", "--layers", "2", "--rounds", "2", "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    meta = json.loads((out / "toyworld.json").read_text())
    assert meta["corrector"] == {"type": "action", "channels": 4, "layers": 2, "actions": 5}
    # two rounds of one episode of two blocks: the second round's rollouts commit the first round's corrector
    assert meta["corrector_train"]["blocks"] == 4 and meta["corrector_train"]["config"]["views"] == "hv"
    first = json.loads((out / "round1" / "toyworld.json").read_text())  # the first round's corrector, kept apart
    assert first["corrector_train"]["blocks"] == 2 and first["corrector_train"]["rounds_done"] == 1
    from safetensors.torch import load_file
    src, new = load_file(str(WEIGHTS.with_suffix(".safetensors"))), load_file(str(out / "toyworld.safetensors"))
    assert sorted(k for k in new if k.startswith("corrector.")) == sorted(
        f"corrector.{k}" for k in ActionCorrector(4, 2, 5).state_dict())
    assert all(torch.equal(v, new[k]) for k, v in src.items() if not k.startswith("corrector."))
    eng = Engine.from_pretrained(str(out / "toyworld.json"), device="cpu")
    assert eng.corrector and eng.bundle.corrector.channels == 4
    with pytest.raises(SystemExit):
        corrector_main(["--views", "x", "--out", str(out)])


def test_pairs_commit_the_views_mean_or_the_given_corrector():
    cfg = CorrectorConfig(episodes=1, frames=8, views="hv")
    p = collect_pairs(WEIGHTS, cfg, progress=False)
    assert p["est"].shape == (2, 4, 3, 64, 64) and p["act"].shape == (2, 4)
    assert torch.equal(p["prev"][1], p["mean"][0, -1].clamp(-1, 1))  # block 2 follows the mean block 1 committed
    assert (p["mean"] - p["est"]).abs().max() > 0.05  # the views do not agree with the world's own estimate
    corr = _random_corrector(2, std=0.3)
    q = collect_pairs(WEIGHTS, cfg, progress=False, corrector=corr)
    assert torch.equal(q["est"][0], p["est"][0]) and torch.equal(q["mean"][0], p["mean"][0])  # same episode
    want = corr.block(q["est"][0].float(), q["prev"][0].float(), q["act"][0])[-1]
    assert (q["prev"][1].float() - want).abs().max() < 2e-2  # (est is stored in float16)
    assert (q["prev"][1].float() - p["prev"][1].float()).abs().max() > 0.1


def test_pairs_through_the_engine_match_the_engine_free_oracle():
    """The engine's pairs against the engine-free rollout's, recorded the same way (its ``combine``): the given
    start frames are committed with no action, as the engine commits any given frames."""
    cfg = CorrectorConfig(episodes=1, frames=8, views="hv")
    p = collect_pairs(WEIGHTS, cfg, progress=False)
    dit, text, meta, decoder, _ = load_parts(WEIGHTS)
    seed, prompt, acts = episode(cfg, 0)
    frames, _ = sim.simulate(seed, acts[:cfg.start_frames], prompt, cfg.start_frames)
    rows = []

    def combine(est, a, last):  # est [V, F, C, H, W]: the world's own estimate first, then the views' mapped back
        rows.append((est[0], last, a.clone(), est.mean(0)))
        return est.mean(0)
    for _ in rollout(dit, text, SamplingConfig.from_dict(meta["sampling"]), prompt, frames, acts[cfg.start_frames:],
                     seed=seed, window=meta["window"], sink=meta["sink"], decoder=decoder, positions="relative",
                     mirrors=("hv",), combine=combine):
        pass
    assert len(rows) == len(p["est"]) == 2
    for i, (est, prev, act, mean) in enumerate(rows):
        assert torch.equal(p["act"][i], act)
        for k, want in (("est", est), ("prev", prev), ("mean", mean)):
            assert (p[k][i].float() - want).abs().max() < 2e-3, (i, k)  # pairs are stored in float16


def test_load_parts_reads_the_bundle_once_and_equals_the_single_loaders(corrected_bundle, monkeypatch):
    import safetensors.torch as st
    real, calls = st.load_file, []
    monkeypatch.setattr(st, "load_file", lambda f, *a, **k: calls.append(f) or real(f, *a, **k))
    dit, text, meta, decoder, corr = load_parts(corrected_bundle)
    assert calls == [str(corrected_bundle.with_suffix(".safetensors"))]
    monkeypatch.undo()
    dit2, text2, meta2 = load_toyworld(corrected_bundle)
    assert meta == meta2 and decoder.refiner is not None and corr is not None
    for a, b in ((dit, dit2), (text, text2), (corr, load_corrector(corrected_bundle, meta2)),
                 (decoder.refiner, load_decoder(corrected_bundle, meta2).refiner)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_no_command_imports_the_engine_free_oracle():
    """The engine-free rollout is a test oracle: the toy world's commands (evaluation, training) run the engine."""
    import subprocess
    import sys
    code = ("import sys, inferix.cli, inferix.app.toyworld.cli, inferix.app.toyworld.eval, "
            "inferix.app.toyworld.train_corrector, inferix.app.toyworld.train_decoder, inferix.models.toyworld.train; "
            "print(sorted(m for m in sys.modules if m.endswith(('toyworld.eval', 'window_kv')) and 'app' not in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
