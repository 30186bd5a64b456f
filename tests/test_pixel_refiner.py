"""The pixel refiner: the module, its place in a bundle and in the engine's decode, its training and export."""
import json

import numpy as np
import pytest
import torch

from inferix.app.toyworld.train_decoder import main as decoder_main
from inferix.engine import Engine
from inferix.models.bundle import load_model
from inferix.models.pixel_decoder import PixelDecoder, PixelRefiner, ReferenceStream
from inferix.models.schedule import SamplingConfig
from inferix.models.toyworld import simulator as sim
from inferix.models.toyworld.decoder_train import (RefinerConfig, estimate_bundle, export_with_refiner, make_pairs,
                                                   make_rollout_pairs, pair_references, rollout_targets, train_refiner)
from inferix.models.toyworld.metrics import palette_share
from inferix.models.toyworld.train import Trainer, export_bundle

from toyworld_helpers import WEIGHTS, micro_config


@pytest.fixture(scope="module")
def micro_bundle(tmp_path_factory):
    torch.manual_seed(0)
    tr = Trainer(micro_config(steps=1))
    tr.train_step()
    return export_bundle(tr, tmp_path_factory.mktemp("micro") / "toyworld.json",
                         sampling=SamplingConfig(denoising_steps=[1000.0], warp=False, shift=1.0, block_frames=2))


def _random_refiner(seed=0, channels=4, layers=3, reference_frames=0) -> PixelRefiner:
    torch.manual_seed(seed)
    r = PixelRefiner(channels, layers, reference_frames)
    torch.nn.init.normal_(r.out.weight, std=0.05)  # not the identity it starts as
    return r


def test_untrained_refiner_is_the_identity_and_rejects_bad_input():
    r = PixelRefiner(8, 3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(r(x), x)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        r(torch.zeros(2, 4, 16, 16))
    with pytest.raises(ValueError, match="layers >= 2"):
        PixelRefiner(8, 1)
    with pytest.raises(ValueError, match="3 channels"):
        PixelDecoder(16, r)


def test_bundle_decoder_refines_engine_frames_and_cache_keeps_the_estimate(micro_bundle, tmp_path):
    ref = _random_refiner()
    out = export_with_refiner(micro_bundle, ref, tmp_path / "b" / "toyworld.json")
    meta = json.loads(out.read_text())
    assert meta["decoder"] == {"type": "pixel", "refiner": {"channels": 4, "layers": 3}}
    b = load_model(out)
    assert isinstance(b.decoder, PixelDecoder) and b.decoder.refiner is not None
    for k, v in ref.state_dict().items():
        assert torch.equal(b.decoder.refiner.state_dict()[k], v), k

    frames, _ = sim.simulate(3, None, "desert", 4)
    kw = dict(num_frames=6, seed=5, init_frames=frames, actions=[1, 1, 2, 2, 3, 3])

    def run(path):
        eng = Engine.from_pretrained(str(path), device="cpu", max_sessions=1)
        return np.concatenate(list(eng.generate("desert", **kw)))
    raw, refined = run(micro_bundle), run(out)
    # Decoding the same estimates (the cache holds the DiT's estimate, not the refined frame, so both runs make
    # the same blocks): refined = refiner(raw), up to the raw frames' rounding.
    with torch.no_grad():
        expect = ref(torch.as_tensor(raw).permute(0, 3, 1, 2).float() / 127.5 - 1).clamp(-1, 1)
    expect = ((expect + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(expect - refined.astype(np.float64)).max() <= 3
    assert np.abs(raw.astype(int) - refined).max() > 10  # the refiner did something


def test_bundle_refiner_weights_are_checked(micro_bundle, tmp_path):
    from safetensors.torch import load_file, save_file
    out = export_with_refiner(micro_bundle, _random_refiner(), tmp_path / "toyworld.json")
    sd = load_file(str(out.with_suffix(".safetensors")))
    save_file({k: v for k, v in sd.items() if k != "decoder.out.bias"}, str(out.with_suffix(".safetensors")))
    with pytest.raises(KeyError, match="decoder.out.bias"):
        load_model(out)
    sd["decoder.out.bias"] = torch.zeros(5)
    save_file(sd, str(out.with_suffix(".safetensors")))
    with pytest.raises(ValueError, match=r"decoder.out.bias has shape \(5,\)"):
        load_model(out)
    meta = json.loads(out.read_text())
    meta["decoder"]["refiner"] = {"channels": 4}
    out.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="integer 'channels' and 'layers'"):
        load_model(out)


def test_pairs_are_engine_blocks_from_true_context(micro_bundle):
    eng = Engine.from_pretrained(str(micro_bundle), device="cpu", max_sessions=1)
    cfg = RefinerConfig(episodes=2, blocks=3, start_frames=4, steps=1, reference_frames=4)
    gen, true = make_pairs(eng, cfg, progress=False)
    bf = eng.block_frames
    assert gen.shape == true.shape == (2 * 3 * bf, 64, 64, 3) and gen.dtype == np.uint8
    # Episode 1, block 2, remade by hand: its true frames, and the engine's block after the truth before it.
    rng = np.random.default_rng([cfg.seed, 1])
    seed, prompt = int(rng.integers(2 ** 31)), sim.random_prompt(rng, list(sim.THEMES)[1])
    n = 4 + 3 * bf
    acts = sim.random_actions(rng, n)
    frames, _ = sim.simulate(seed, acts, prompt, n)
    b = 4 + 2 * bf
    i = (3 + 2) * bf
    assert np.array_equal(true[i:i + bf], frames[b:b + bf])
    keep = np.r_[0:min(eng.sink, b), max(eng.sink, b - (eng.window - bf)):b]
    blk = np.concatenate(list(eng.generate(prompt, num_frames=bf, seed=seed + b, init_frames=frames[keep],
                                           actions=[int(a) for a in acts[b:b + bf]])))
    assert np.array_equal(gen[i:i + bf], blk)
    assert isinstance(eng.bundle.decoder, PixelDecoder) and eng.bundle.decoder.refiner is None
    with pytest.raises(ValueError, match="start_frames 3"):
        make_pairs(eng, RefinerConfig(episodes=1, blocks=1, start_frames=3, reference_frames=3), progress=False)


def test_pairs_need_an_engine_that_yields_the_estimate(micro_bundle, tmp_path):
    """A bundle with a refiner: its engine is refused, and one built on estimate_bundle gives the refiner-less pairs."""
    refined = export_with_refiner(micro_bundle, _random_refiner(), tmp_path / "r" / "toyworld.json")
    cfg = RefinerConfig(episodes=1, blocks=1, start_frames=4, rollout_episodes=1, rollout_frames=4, reference_frames=0)
    with pytest.raises(ValueError, match="estimate_bundle"):
        make_pairs(Engine.from_pretrained(str(refined), device="cpu", max_sessions=1), cfg, progress=False)
    plain = Engine.from_pretrained(str(micro_bundle), device="cpu", max_sessions=1)
    est = Engine(estimate_bundle(load_model(str(refined))), device="cpu", max_sessions=1)
    with pytest.raises(ValueError, match="estimate_bundle"):
        make_rollout_pairs(Engine.from_pretrained(str(refined), device="cpu", max_sessions=1), cfg, progress=False)
    for a, b in zip(make_pairs(plain, cfg, progress=False), make_pairs(est, cfg, progress=False)):
        assert np.array_equal(a, b)
    for a, b in zip(make_rollout_pairs(plain, cfg, progress=False), make_rollout_pairs(est, cfg, progress=False)):
        assert np.array_equal(a, b)


def test_rollout_targets_draw_the_models_sprites_on_the_scene():
    _, _, bg = sim.simulate(5, ["right"] * 4, "snow", 4, return_background=True)
    gen = np.stack([bg] * 4)
    gen[0, 40:46, 11:17] = sim.AGENT_COLOR  # an agent off the 2-px lattice
    gen[0, 40:46, 11:17, 1] += 30  # and not quite its colour
    gen[1] = sim.draw_sprites(bg, ball=(30, 20))  # a ball, no agent
    gen[2, 20:22, 20:22] = sim.AGENT_COLOR  # 4 agent-coloured pixels: too few to be an agent
    tg, w = rollout_targets(gen, bg)
    assert tg.shape == gen.shape and w.shape == gen.shape[:3] and w.dtype == bool
    agent = (tg[0] == np.asarray(sim.AGENT_COLOR, np.uint8)).all(-1)
    ys, xs = np.nonzero(agent)
    assert agent.sum() == 36 and ys.min() == 40 and xs.min() in (10, 12) and xs.min() % 2 == 0
    assert np.array_equal(tg[0][~agent], bg[~agent]) and w[0].all()
    assert np.array_equal(tg[1], sim.draw_sprites(bg, ball=(30, 20))) and w[1].all()
    assert np.array_equal(tg[2], bg) and np.array_equal(tg[3], bg) and w[3].all()
    assert not w[2, 17:25, 17:25].any() and w[2, 26:, :].all() and w[2, :, 26:].all()  # unsure within 3 px
    with pytest.raises(ValueError, match="gen must be"):
        rollout_targets(gen[:, :32], bg)


def test_rollout_pairs_are_the_engines_rollout_with_its_own_sprites_as_targets(micro_bundle):
    eng = Engine.from_pretrained(str(micro_bundle), device="cpu", max_sessions=1)
    cfg = RefinerConfig(rollout_episodes=1, rollout_frames=6, start_frames=4, reference_frames=4)
    gen, target, w = make_rollout_pairs(eng, cfg, progress=False)
    assert gen.shape == target.shape == (6, 64, 64, 3) and w.shape == (6, 64, 64) and w.dtype == bool
    rng = np.random.default_rng([cfg.seed, 10_000])
    seed, prompt = int(rng.integers(2 ** 31)), sim.random_prompt(rng, list(sim.THEMES)[0])
    acts = sim.random_actions(rng, 10)
    frames, _, bg = sim.simulate(seed, acts, prompt, 10, return_background=True)
    again = np.concatenate(list(eng.generate(prompt, num_frames=6, seed=seed, init_frames=frames[:4],
                                             actions=[int(a) for a in acts[4:]])))
    assert np.array_equal(gen, again)
    want_t, want_w = rollout_targets(gen, bg)
    assert np.array_equal(target, want_t) and np.array_equal(w, want_w)


@pytest.mark.slow
def test_training_reduces_the_loss():
    """Pairs (washed-out frame, frame): the L1 loss must fall well below the washed-out frames' own error."""
    frames, _ = sim.simulate(11, None, "meadow", 48)
    gen = (0.7 * frames + 0.3 * 128).round().astype(np.uint8)
    base = np.abs(gen.astype(np.float32) - frames).mean() / 127.5
    _, losses = train_refiner(gen, frames, RefinerConfig(steps=100, batch=8, channels=8, layers=3, lr=5e-3, reference_frames=0),
                              progress=False)
    assert losses[0] == pytest.approx(base, rel=0.1)  # starts as the identity
    assert np.mean(losses[-20:]) < 0.3 * base, (base, losses[-20:])
    with pytest.raises(ValueError, match="one shape"):
        train_refiner(gen[:2], frames[:3], RefinerConfig(steps=1, reference_frames=0))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        RefinerConfig(steps=0)


def test_cli_writes_a_loadable_bundle(micro_bundle, tmp_path, capsys):
    out = tmp_path / "dec"
    assert decoder_main(["--model", str(micro_bundle), "--out", str(out), "--episodes", "1", "--blocks", "1",
                         "--start-frames", "2", "--steps", "3", "--batch", "2", "--channels", "4", "--layers", "2",
                         "--rollout-episodes", "1", "--rollout-frames", "2", "--denoising-steps", "1000,500", "--reference-frames", "0"]) == 0
    meta = json.loads((out / "toyworld.json").read_text())
    assert meta["sampling"]["denoising_steps"] == [1000.0, 500.0]
    assert meta["decoder_train"]["pairs"] == 4 and meta["decoder"]["refiner"] == {"channels": 4, "layers": 2}
    assert load_model(out / "toyworld.json").decoder.refiner is not None
    with pytest.raises(SystemExit):
        decoder_main(["--model", str(micro_bundle), "--out", str(out), "--denoising-steps", "0"])
    assert "--denoising-steps must lie in" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nope.json"):
        decoder_main(["--model", str(tmp_path / "nope.json"), "--out", str(out)])


# ---- refiners with a reference image ----------------------------------------------------------------------------
def _lower_median(frames_u8: np.ndarray) -> np.ndarray:
    """Naive reference: per pixel and channel, the lower middle value of the sorted frames, as a latent [3, H, W]."""
    s = np.sort(frames_u8.astype(np.float64), axis=0)
    return (s[(len(s) - 1) // 2] / 127.5 - 1).transpose(2, 0, 1)


def test_reference_refiner_checks_its_inputs():
    r = PixelRefiner(8, 3, reference_frames=4)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(r(x, torch.zeros_like(x)), x)  # untrained: the identity, whatever the reference
    assert r.config() == {"channels": 8, "layers": 3, "reference_frames": 4}
    assert PixelRefiner(8, 3).config() == {"channels": 8, "layers": 3}  # bundles without one are unchanged
    with pytest.raises(ValueError, match="needs a reference image"):
        r(x)
    with pytest.raises(ValueError, match="needs a reference image"):
        r(x, torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="takes no reference"):
        PixelRefiner(8, 3)(x, x)
    with pytest.raises(ValueError, match="reference_frames must be >= 0"):
        PixelRefiner(8, 3, -1)
    with pytest.raises(TypeError, match="new_stream"):
        PixelDecoder(3, r).refine_stream(None, x)


def test_reference_stream_keeps_the_first_frames_and_gives_their_median():
    frames, _ = sim.simulate(4, None, "night", 7)
    dec = PixelDecoder(3, _random_refiner(reference_frames=5))
    st = dec.new_stream()
    assert isinstance(st, ReferenceStream) and PixelDecoder(3, _random_refiner()).new_stream() is None
    lat = torch.as_tensor(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    # Blocks of 3: the first block's reference is its own median; from the second on, the first 5 frames'.
    for b, upto in ((0, 3), (3, 5), (6, 5)):
        ref = st.reference(lat[b:b + 3])
        assert np.allclose(ref.numpy(), _lower_median(frames[:upto]), atol=1e-6), b
    assert len(st.frames) == 5
    # decode_block = the refiner on each frame with that reference
    st2 = dec.new_stream()
    dec.decode_block(st2, lat[None, :5])
    out = dec.decode_block(st2, lat[None, 5:7])
    with torch.no_grad():
        want = dec.refiner(lat[5:7], torch.as_tensor(_lower_median(frames[:5])).float().expand(2, -1, -1, -1))
    want = ((want.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(want - out).max() <= 1


def test_engine_and_engine_free_rollout_refine_with_the_start_frames_reference(micro_bundle, tmp_path):
    from inferix.models.toyworld.eval import load_decoder, load_toyworld, rollout
    ref = _random_refiner(seed=3, reference_frames=4)
    out = export_with_refiner(micro_bundle, ref, tmp_path / "r" / "toyworld.json")
    assert json.loads(out.read_text())["decoder"]["refiner"]["reference_frames"] == 4
    acts = sim.random_actions(np.random.default_rng(2), 12)
    frames, _ = sim.simulate(8, acts, "snow", 12)
    kw = dict(num_frames=6, seed=5, init_frames=frames[:6], actions=[int(a) for a in acts[6:]])
    eng = Engine.from_pretrained(str(out), device="cpu", max_sessions=1)
    refined = np.concatenate(list(eng.generate("snow", **kw)))
    raw_eng = Engine(estimate_bundle(load_model(str(out))), device="cpu", max_sessions=1)
    raw = np.concatenate(list(raw_eng.generate("snow", **kw)))
    with torch.no_grad():  # naive: the refiner on each raw frame, the reference from the first 4 start frames
        x = torch.as_tensor(raw).permute(0, 3, 1, 2).float() / 127.5 - 1
        expect = ref(x, torch.as_tensor(_lower_median(frames[:4])).float().expand_as(x)).clamp(-1, 1)
    expect = ((expect + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(expect - refined.astype(np.float64)).max() <= 3
    assert np.abs(raw.astype(int) - refined).max() > 10
    # the engine-free rollout primes its decoder stream the same way
    dit, text, meta = load_toyworld(out)
    sampling = SamplingConfig.from_dict(meta["sampling"])
    free = np.concatenate(list(rollout(dit, text, sampling, "snow", frames[:6], acts[6:], seed=5,
                                       window=meta["window"], sink=meta["sink"], decoder=load_decoder(out, meta),
                                       positions=meta.get("positions") or "relative")))
    assert np.abs(free.astype(int) - refined).max() <= 2


@pytest.mark.slow
def test_reference_training_uses_the_reference():
    """Pairs whose estimate is a grey frame: only the reference shows the scene, so a refiner that reads it must
    end far below one that cannot."""
    frames, _ = sim.simulate(12, ["none"] * 24, "desert", 24)
    gen = np.full_like(frames, 128)
    table, index = frames[:1], np.zeros(len(gen), int)  # the agent stands still: frame 0 is the scene
    kw = dict(steps=150, batch=8, channels=8, layers=3, lr=5e-3, self_reference_p=0.0)
    _, plain = train_refiner(gen, frames, RefinerConfig(reference_frames=0, **kw), progress=False)
    _, withref = train_refiner(gen, frames, RefinerConfig(reference_frames=1, **kw), progress=False,
                               ref=(table, index))
    assert np.mean(withref[-20:]) < 0.5 * np.mean(plain[-20:]), (np.mean(withref[-20:]), np.mean(plain[-20:]))
    with pytest.raises(ValueError, match="needs each pair's reference"):
        train_refiner(gen, frames, RefinerConfig(reference_frames=1, steps=1), progress=False)
    with pytest.raises(ValueError, match="index"):
        train_refiner(gen, frames, RefinerConfig(reference_frames=1, steps=1), progress=False,
                      ref=(table, np.ones(len(gen), int)))
    with pytest.raises(ValueError, match="must not exceed start_frames"):
        RefinerConfig(reference_frames=9, start_frames=8)


def test_pair_references_follow_the_pairs_episodes(micro_bundle):
    eng = Engine.from_pretrained(str(micro_bundle), device="cpu", max_sessions=1)
    bf = eng.block_frames
    cfg = RefinerConfig(episodes=2, blocks=2, start_frames=4, rollout_episodes=1, rollout_frames=4,
                        reference_frames=3)
    n_pairs = len(make_pairs(eng, cfg, progress=False)[0]) + len(make_rollout_pairs(eng, cfg, progress=False)[0])
    table, index = pair_references(cfg, bf)
    assert table.shape == (3, 64, 64, 3) and table.dtype == np.uint8 and len(index) == n_pairs
    assert list(index) == [0] * 2 * bf + [1] * 2 * bf + [2] * 4
    rng = np.random.default_rng([cfg.seed, 10_000])  # the rollout episode's start frames, remade by hand
    seed, prompt = int(rng.integers(2 ** 31)), sim.random_prompt(rng, list(sim.THEMES)[0])
    frames, _ = sim.simulate(seed, sim.random_actions(rng, 8), prompt, 8)
    want = np.round((_lower_median(frames[:3]).transpose(1, 2, 0) + 1) * 127.5)
    assert np.array_equal(table[2], want.astype(np.uint8))


def test_cli_trains_a_reference_refiner(micro_bundle, tmp_path, capsys):
    out = tmp_path / "dec"
    args = ["--model", str(micro_bundle), "--out", str(out), "--episodes", "1", "--blocks", "1", "--start-frames",
            "2", "--steps", "3", "--batch", "2", "--channels", "4", "--layers", "2", "--rollout-episodes", "1",
            "--rollout-frames", "2"]
    assert decoder_main(args + ["--reference-frames", "2"]) == 0
    meta = json.loads((out / "toyworld.json").read_text())
    assert meta["decoder"]["refiner"] == {"channels": 4, "layers": 2, "reference_frames": 2}
    assert load_model(out / "toyworld.json").decoder.reference_frames == 2
    with pytest.raises(SystemExit):
        decoder_main(args + ["--reference-frames", "3"])
    assert "must not exceed start_frames" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_refiner_makes_frames_closer_to_the_palette():
    """The shipped bundle's refiner against decoding the same estimates without it, over 32 frames."""
    meta = json.loads(WEIGHTS.read_text())
    assert meta["decoder"].get("refiner"), "the shipped toy world decodes through its refiner"
    acts = sim.random_actions(np.random.default_rng(31), 40)
    frames, _ = sim.simulate(31, acts, "a forest", 40)
    eng = Engine.from_pretrained("toyworld", device="cpu", max_sessions=1)
    raw_eng = Engine(estimate_bundle(load_model("toyworld")), device="cpu", max_sessions=1)
    kw = dict(num_frames=32, seed=1, init_frames=frames[:8], actions=[int(a) for a in acts[8:]])
    refined = np.concatenate(list(eng.generate("a forest", **kw)))
    raw = np.concatenate(list(raw_eng.generate("a forest", **kw)))
    assert palette_share(refined).mean() > palette_share(raw).mean() + 0.1
