"""Toy world models: export, the standalone rollout against the engine, the shipped weights.

Training is tested in test_toyworld_train.py, the simulator and the metrics in test_toyworld_world.py."""
import json

import numpy as np
import pytest
import torch

from inferix.kernels.attention import BlockCausalMeta, ReferenceBackend
from inferix.models.schedule import SamplingConfig
from inferix.models.toyworld import simulator as sim
from inferix.models.toyworld.eval import (RolloutMeta, WindowKVBackend, load_corrector, load_decoder, load_toyworld,
                                         rollout)
from inferix.models.toyworld.metrics import rollout_metrics
from inferix.models.toyworld.text import LocalHashTextEncoder
from inferix.models.toyworld.train import Trainer, export_bundle, to_latent

from toyworld_helpers import WEIGHTS, micro_config


def test_export_loads_and_rollout_equals_block_causal_forward(tmp_path):
    cfg = micro_config(steps=2)
    tr = Trainer(cfg)
    tr.train_step()
    path = export_bundle(tr, tmp_path / "toyworld.json",
                         sampling=SamplingConfig(denoising_steps=[1000.0, 500.0], warp=False, shift=1.0,
                                                 block_frames=2))
    meta = json.loads(path.read_text())
    assert meta["format"] == "inferix-bundle" and meta["decoder"] == {"type": "pixel"}
    assert meta["actions"] == sim.ACTIONS and meta["window"] > meta["sampling"]["block_frames"]
    dit, text, _ = load_toyworld(path)
    # The shared text encoder reads the re-indexed table exactly like the trainer's encoder read its own.
    local = LocalHashTextEncoder(8, 8, cfg.text_vocab, cfg.text_seed)
    local.embedding.weight.data.copy_(tr.named(ema=True)["text.embedding.weight"])  # the bundle holds EMA weights
    for p in ("a cube walks through the snow", "desert", ""):
        assert torch.equal(text.encode(p), local.encode(p).detach()), p
    # Incremental (committed K/V) equals one block-causal pass over [clean context | noised block].
    frames, _ = sim.simulate(4, None, "forest", 6)
    acts = torch.tensor([[1, 1, 2, 0, 3, 4]])
    ctx = dit.prepare_text(text.encode("forest"))
    be = WindowKVBackend(1, 64, window=6, sink=0, block_frames=2)
    x_ctx = to_latent(frames[:4])[None]
    with torch.no_grad():
        for b in (0, 2):  # the second commit as the rollout makes it: K/V only, the last layer stops there
            dit(x_ctx[:, b:b + 2], torch.zeros(1, 2), ctx, frame_pos=torch.tensor([[b, b + 1]]),
                meta=RolloutMeta(True), backend=be, actions=acts[:, b:b + 2], kv_only=b == 2)
        noisy = torch.randn(1, 2, 3, 64, 64)
        inc = dit(noisy, torch.full((1, 2), 800.0), ctx, frame_pos=torch.tensor([[4, 5]]), meta=RolloutMeta(False),
                  backend=be, actions=acts[:, 4:])
        full = dit(torch.cat([x_ctx, noisy], 1), torch.tensor([[0.0] * 4 + [800.0] * 2]), ctx,
                   frame_pos=torch.arange(6)[None], meta=BlockCausalMeta(64, 2), backend=ReferenceBackend(),
                   actions=acts)
    assert torch.allclose(inc, full[:, 4:], atol=1e-4)
    assert be.frames_cached() == 4
    sampling = SamplingConfig.from_dict(meta["sampling"])
    blocks = list(rollout(dit, text, sampling, "forest", frames[:4], [1, 2, 3, 4, 0], seed=0,
                          window=meta["window"]))
    assert [b.shape for b in blocks] == [(2, 64, 64, 3), (2, 64, 64, 3), (1, 64, 64, 3)]
    with pytest.raises(ValueError, match="multiple of block_frames"):
        next(rollout(dit, text, sampling, "forest", frames[:3], [1], window=6))


def test_window_backend_keeps_sink_and_recent_frames():
    be = WindowKVBackend(1, frame_tokens=1, window=4, sink=1, block_frames=2)
    for f in range(5):  # commit frames 0..4 one at a time; keys carry their frame index
        k = torch.full((1, 1, 1, 2), float(f))
        be.attend(k, k, k, 0, RolloutMeta(True))
    assert be.k[0][0, :, 0, 0].tolist() == [0.0, 4.0]  # sink frame 0 + the most recent: 2 frames + a block of 2
    only = WindowKVBackend(1, frame_tokens=1, window=4, sink=1, block_frames=2)
    for f in range(5):  # the same commits as cache writes alone (a commit pass's last layer)
        k = torch.full((1, 1, 1, 2), float(f))
        only.write_kv(k, 2 * k, 0, RolloutMeta(True))
    assert only.k[0][0, :, 0, 0].tolist() == [0.0, 4.0] and only.v[0][0, :, 0, 0].tolist() == [0.0, 8.0]
    with pytest.raises(ValueError, match="commit"):
        only.write_kv(k, k, 0, RolloutMeta(False))
    with pytest.raises(ValueError, match="sink"):
        WindowKVBackend(1, frame_tokens=1, window=4, sink=3, block_frames=2)


def test_engine_free_rollout_gives_the_engines_frames():
    """Same bundle, seed, start frames and actions: the standalone rollout (sink, window and cache-relative
    positions taken from the bundle) yields the engine's frames, also after the cache starts dropping frames."""
    from inferix.engine import Engine
    meta = json.loads(WEIGHTS.read_text())
    assert meta.get("positions", "relative") == "relative" and meta["sink"] > 0  # the engine's "auto" with a window
    acts = sim.random_actions(np.random.default_rng(5), 40)
    frames, _ = sim.simulate(5, acts, "desert", 40)
    n_gen = 32  # 8 blocks after the 8 start frames: the window (16 frames) is full from the third block on
    eng = Engine.from_pretrained("toyworld", device="cpu", max_sessions=1)
    want = np.concatenate(list(eng.generate("a cube in the desert", num_frames=n_gen, seed=3, init_frames=frames[:8],
                                            actions=[int(a) for a in acts[8:]])))
    dit, text, _ = load_toyworld(WEIGHTS)
    sampling = SamplingConfig.from_dict(meta["sampling"])
    dec = load_decoder(WEIGHTS, meta)
    kw = dict(seed=3, window=meta["window"], sink=meta["sink"], decoder=dec,
              corrector=load_corrector(WEIGHTS, meta))  # the engine runs the bundle's corrector, if it has one
    got = np.concatenate(list(rollout(dit, text, sampling, "a cube in the desert", frames[:8], acts[8:], **kw,
                                      positions="relative")))
    assert got.shape == want.shape == (n_gen, 64, 64, 3)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    # Absolute positions are a different model input: the frames differ once the cache holds a gap.
    other = np.concatenate(list(rollout(dit, text, sampling, "a cube in the desert", frames[:8], acts[8:], **kw,
                                        positions="absolute")))
    assert np.abs(other.astype(int) - want.astype(int))[16:].mean() > 1.0


# ---- the shipped weights -------------------------------------------------------------------------
def test_shipped_bundle_is_small_and_continues_the_scene():
    """A floor that broken or badly loaded weights cannot pass (random weights: 6 dB, 5% palette pixels), not the
    quality targets: the shipped model gives 22.9 dB and 98% here (docs/toyworld.md)."""
    meta = json.loads(WEIGHTS.read_text())
    assert WEIGHTS.with_suffix(".safetensors").stat().st_size <= 20 * 2 ** 20
    assert meta["dit"]["prediction"] == "x0" and meta["dit"]["in_dim"] == 3 and meta["height"] == 64
    assert meta["actions"] == sim.ACTIONS and meta["train"]["steps"] > 0
    dit, text, meta = load_toyworld(WEIGHTS)
    sampling = SamplingConfig.from_dict(meta["sampling"])
    acts = sim.random_actions(np.random.default_rng(777), 24)
    frames, pos = sim.simulate(777, acts, "snow", 24)
    gen = np.concatenate(list(rollout(dit, text, sampling, "snow", frames[:8], acts[8:], seed=0,
                                      window=meta["window"], sink=meta["sink"], init_actions=acts[:8],
                                      decoder=load_decoder(WEIGHTS, meta))))
    m = rollout_metrics(gen, frames[8:], pos[8:], frames[:8])["summary"]
    assert m["psnr_per_32"][0] > 15.0, m
    assert m["palette_share_per_100"][0] > 0.8, m
