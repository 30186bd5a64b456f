"""Toy world training: teacher-forcing attention, the trainer, and the sink layout it trains in (the engine's
cache: sink blocks + the blocks generated last)."""
import math

import numpy as np
import pytest
import torch

from inferix.kernels.attention import BlockCausalMeta, ReferenceBackend
from inferix.models.toyworld import simulator as sim
from inferix.models.toyworld.metrics import detect_color
from inferix.models.toyworld.text import word_ids
from inferix.models.toyworld.train import main as train_main
from inferix.models.toyworld.train import (BatchPrefetcher, TeacherForcingBackend, TeacherForcingMeta, Trainer,
                                           export_bundle, make_batch, rollout_blocks_at, to_latent, to_pixels)
from inferix.models.toyworld.export import training_words

from toyworld_helpers import micro_config


# ---- teacher forcing -----------------------------------------------------------------------------
def test_teacher_forcing_mask_matches_its_definition():
    T, bf, n = 2, 2, 3
    meta = TeacherForcingMeta(T, bf, n)
    L = 2 * n * bf * T
    m = meta.mask(L, "cpu")
    P = T * bf
    for q in range(L):
        for k in range(L):
            qn, qb, kn, kb = q // P >= n, (q // P) % n, k // P >= n, (k // P) % n
            want = (kb <= qb) if (not qn and not kn) else (qn and ((not kn and kb < qb) or (kn and kb == qb)))
            assert bool(m[q, k]) == want, (q, k)


def test_teacher_forcing_backend_equals_masked_reference():
    torch.manual_seed(0)
    meta = TeacherForcingMeta(frame_tokens=4, block_frames=2, num_blocks=3)
    L = 2 * 3 * 2 * 4
    q, k, v = (torch.randn(2, L, 2, 8) for _ in range(3))
    want = ReferenceBackend().masked(q, k, v, meta.mask(L, "cpu"))
    got = TeacherForcingBackend().attend(q, k, v, 0, meta)
    assert torch.allclose(got, want, atol=1e-5)


def test_noised_block_prediction_sees_only_clean_context():
    """Changing a later clean block or another noised block must not change a noised block's prediction."""
    cfg = micro_config(clip_blocks=3)
    tr = Trainer(cfg)
    b = make_batch(cfg, 0)
    F_ = 6
    x = torch.cat([b["x0"], torch.randn_like(b["x0"])], 1)
    t = torch.cat([torch.zeros(2, F_), torch.full((2, F_), 700.0)], 1)
    pos = torch.arange(F_).repeat(2)[None].expand(2, -1)
    acts = b["actions"].repeat(1, 2)
    ctx = torch.cat([tr.text.encode(p) for p in b["prompts"]])
    with torch.no_grad():
        base = tr.dit(x, t, ctx, frame_pos=pos, meta=tr.meta, backend=tr.backend, actions=acts)
        x2 = x.clone()
        x2[:, 4:6] += 1.0  # clean block 2
        x2[:, 10:12] += 1.0  # noised block 2
        out = tr.dit(x2, t, ctx, frame_pos=pos, meta=tr.meta, backend=tr.backend, actions=acts)
    assert torch.allclose(out[:, 6:10], base[:, 6:10], atol=1e-5)  # noised blocks 0 and 1 unchanged
    assert not torch.allclose(out[:, 10:12], base[:, 10:12], atol=1e-3)


# ---- trainer -------------------------------------------------------------------------------------
def test_batches_are_a_function_of_seed_and_step():
    cfg = micro_config()
    a, b, c = make_batch(cfg, 3), make_batch(cfg, 3), make_batch(cfg, 4)
    assert torch.equal(a["x0"], b["x0"]) and a["prompts"] == b["prompts"]
    assert not torch.equal(a["x0"], c["x0"])
    assert a["x0"].shape == (2, 4, 3, 64, 64) and a["actions"].shape == (2, 4)
    assert a["x0"].min() >= -1 and a["x0"].max() <= 1
    assert np.array_equal(to_pixels(to_latent(np.arange(256, dtype=np.uint8).reshape(1, 1, 256, 1)
                                              .repeat(3, -1))).ravel()[::3], np.arange(256))


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    tr = Trainer(micro_config(steps=40))
    losses = [tr.train_step()["loss"] for _ in range(40)]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:4]), losses


def test_p_sigma_one_sets_the_share_of_targets_at_pure_noise():
    seen = []
    for p in (1.0, 0.0):
        tr = Trainer(micro_config(p_sigma_one=p, batch=4))
        fwd = tr.dit.forward

        def record(x, t, *a, _fwd=fwd, **kw):
            seen.append((p, t.detach().clone()))
            return _fwd(x, t, *a, **kw)
        tr.dit.forward = record
        tr.loss_on(make_batch(tr.cfg, 0), torch.Generator().manual_seed(0))
    targets = {p: t[:, -tr.cfg.block_frames:] for p, t in seen}  # the noised copy of the last block
    assert (targets[1.0] == 1000).all() and (targets[0.0] < 1000).all()
    with pytest.raises(ValueError, match="p_sigma_one"):
        micro_config(p_sigma_one=1.5)


@pytest.mark.slow
def test_prefetched_batches_train_exactly_like_batches_made_in_the_loop():
    # worker processes simulate ahead; the trainer must see the very same batches (rollout steps included)
    cfg = micro_config(steps=4, rollout_p=0.5, rollout_max_blocks=2, seed=1)
    a, b = Trainer(cfg), Trainer(cfg)
    pre = BatchPrefetcher(cfg, workers=1, depth=2)
    try:
        with pytest.raises(ValueError, match="step 1"):
            b.train_step(pre.get(1))  # b is at step 0
        la = [a.train_step()["loss"] for _ in range(4)]
        lb = [b.train_step(pre.get(s))["loss"] for s in range(4)]
    finally:
        pre.close()
    assert any(rollout_blocks_at(cfg, s) for s in range(4))
    assert la == pytest.approx(lb, rel=1e-6, abs=0)


def test_resume_continues_exactly(tmp_path):
    cfg = micro_config(steps=6)
    a = Trainer(cfg)
    for _ in range(3):
        a.train_step()
    a.save(tmp_path / "ck")
    assert set(p.name for p in (tmp_path / "ck").iterdir()) == {"ckpt.safetensors", "optim.pt", "state.json"}
    torch.load(tmp_path / "ck" / "optim.pt", weights_only=True)  # loadable without pickled code
    b = Trainer(cfg)
    b.load(tmp_path / "ck")
    assert b.step == 3
    la, lb = a.train_step()["loss"], b.train_step()["loss"]
    assert la == pytest.approx(lb, rel=1e-5)
    with pytest.raises(FileNotFoundError, match="optim.pt"):
        (tmp_path / "ck" / "optim.pt").unlink()
        Trainer(cfg).load(tmp_path / "ck")
    # Exporting needs the weights only: no optimizer state, the EMA weights as they were saved.
    assert train_main(["--resume", str(tmp_path / "ck"), "--export-only", "--out", str(tmp_path / "ex")]) == 0
    from safetensors.torch import load_file
    exported = load_file(str(tmp_path / "ex" / "toyworld.safetensors"))
    saved = load_file(str(tmp_path / "ck" / "ckpt.safetensors"))
    ema = {k[4:]: v for k, v in saved.items() if k.startswith("ema.dit.")}
    assert ema and all(torch.equal(exported[k], v) for k, v in ema.items())


def test_rollout_mode_trains_on_the_models_own_context(tmp_path):
    cfg = micro_config(steps=4, rollout_p=1.0, rollout_max_blocks=3)
    plain = micro_config(steps=4)
    assert [rollout_blocks_at(plain, s) for s in range(20)] == [0] * 20
    depths = [rollout_blocks_at(cfg, s) for s in range(20)]
    assert min(depths) >= 1 and max(depths) <= 3 and len(set(depths)) > 1
    assert [rollout_blocks_at(micro_config(rollout_p=0.5), s) for s in range(40)].count(0) in range(8, 33)
    tr = Trainer(cfg)
    tr.train_step()  # move the weights off their init, so the rollout is not a trivial function
    step = tr.step
    d = rollout_blocks_at(cfg, step)
    batch = tr.make_train_batch(step, torch.Generator().manual_seed(123))
    long = make_batch(cfg, step, extra_blocks=d)  # the true frames the rollout started from
    bf = cfg.block_frames
    assert batch["rollout_blocks"] == d
    assert torch.equal(batch["x0"], long["x0"][:, -2 * bf:]) and torch.equal(batch["actions"], long["actions"][:, -2 * bf:])
    assert batch["context"].shape == (2, bf, 3, 64, 64)
    # Naive re-computation of the rollout: true block 0, then one block at a time from pure noise (sigma 1),
    # the previous block as clean context at t = 0, positions 0.., masked reference attention, clamped x0.
    g = torch.Generator().manual_seed(123)
    ctx = torch.cat([tr.text.encode(p) for p in long["prompts"]]).detach()
    prev = long["x0"][:, :bf]
    meta = BlockCausalMeta(frame_tokens=64, block_frames=bf)
    with torch.no_grad():
        for j in range(1, d + 1):
            x = torch.cat([prev, torch.randn((2, bf, 3, 64, 64), generator=g)], 1)
            t = torch.tensor([0.0] * bf + [1000.0] * bf).expand(2, -1)
            out = tr.dit(x, t, ctx, frame_pos=torch.arange(2 * bf).expand(2, -1), meta=meta,
                         backend=ReferenceBackend(), actions=long["actions"][:, (j - 1) * bf:(j + 1) * bf])
            prev = out[:, bf:].clamp(-1, 1)
    assert torch.allclose(batch["context"], prev, atol=1e-4)
    true_ctx = long["x0"][:, d * bf:(d + 1) * bf]
    assert (batch["context"] - true_ctx).abs().mean() > 0.05  # the model's frames, not the truth
    # Training steps on it: finite losses, every step a rollout step, and the weights move.
    before = [p.detach().clone() for p in tr.params]
    infos = [tr.train_step() for _ in range(3)]
    assert all(math.isfinite(i["loss"]) and i["rollout"] >= 1 for i in infos)
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.params))
    # --init: a new run that starts from the checkpoint's EMA weights.
    tr.save(tmp_path / "ck")
    fresh = Trainer(micro_config(seed=5, rollout_p=0.5))
    fresh.init_from(tmp_path / "ck")
    assert fresh.step == 0
    assert all(torch.equal(p, e) for p, e in zip(fresh.params, tr.ema))
    # --init from an exported bundle: the same weights, the text table mapped back to the trainer's rows.
    export_bundle(tr, tmp_path / "b" / "toyworld.json")
    from_bundle = Trainer(micro_config(seed=6, rollout_p=0.5))
    from_bundle.init_from(tmp_path / "b" / "toyworld.json")
    for (name, p), e in zip(from_bundle.named(False).items(), tr.ema):
        if name == "text.embedding.weight":  # the rows the training prompts reach
            rows = [word_ids(w, 1, tr.text.vocab, tr.text.seed)[0] for w in training_words()]
            assert torch.equal(p[rows], e.detach()[rows]), name
        else:
            assert torch.equal(p, e.detach()), name




# ---- sink layout (the engine's cache: sink blocks + the blocks generated last) ---------------------
def test_teacher_forcing_with_sink_targets_masks_and_backend():
    T, bf, n, ft = 2, 2, 4, 2
    meta = TeacherForcingMeta(T, bf, n, first_target=ft)
    P = T * bf
    slots = [("c", b) for b in range(n - 1)] + [("n", b) for b in range(ft, n)]  # the clean last block is left out
    L = len(slots) * P
    m = meta.mask(L, "cpu")
    for q in range(L):
        for k in range(L):
            (qk, qb), (kk, kb) = slots[q // P], slots[k // P]
            want = (kb <= qb) if (qk == kk == "c") else (qk == "n" and ((kk == "c" and kb < qb) or (kk == "n" and kb == qb)))
            assert bool(m[q, k]) == want, (q, k)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, L, 2, 8) for _ in range(3))
    want = ReferenceBackend().masked(q, k, v, m)
    assert torch.allclose(TeacherForcingBackend().attend(q, k, v, 0, meta), want, atol=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        meta.mask(L + P, "cpu")
    with pytest.raises(ValueError, match="first_target"):
        TeacherForcingMeta(T, bf, n, first_target=n)


def _ball_turns_in_last_block(px: np.ndarray, bf: int) -> bool:
    """From pixels alone: does the ball stop or turn on some axis in the clip's last bf frames? (Its speed is
    never 0 on an axis, so a zero or reversed displacement there is a bounce.) px: uint8 [F, H, W, 3]."""
    c = detect_color(px[-bf - 2:], sim.BALL_COLOR, tol=10.0, min_pixels=1)  # [bf + 2, 2]
    d = np.diff(c, axis=0)  # displacements into the frames from the one before the last block on
    return bool(((np.abs(d) < 0.5) | (np.sign(d) != np.sign(d[:1]))).any())


def test_bounce_p_picks_episodes_whose_ball_bounces_in_the_last_block():
    for kw in ({}, {"clip_blocks": 4, "sink_blocks": 2, "max_start": 40}, {"clip_blocks": 3, "bounce_blocks": 2}):
        turned = {}
        for p in (0.0, 1.0):
            cfg = micro_config(batch=12, bounce_p=p, **kw)
            hits = [_ball_turns_in_last_block(clip, cfg.block_frames * cfg.bounce_blocks)
                    for step in range(2) for clip in to_pixels(make_batch(cfg, step)["x0"])]
            turned[p] = float(np.mean(hits))
        assert turned[1.0] == 1.0 and turned[0.0] < 0.6, (kw, turned)
    with pytest.raises(ValueError, match="bounce_p"):
        micro_config(bounce_p=1.5)
    with pytest.raises(ValueError, match="bounce_blocks"):
        micro_config(clip_blocks=4, sink_blocks=2, bounce_blocks=3)


def test_sink_batches_hold_the_episode_start_then_a_later_stretch():
    cfg = micro_config(clip_blocks=4, sink_blocks=2, max_start=40, batch=6, p_no_gap=0.5)
    S = 4
    gaps = []
    for step in range(4):
        b = make_batch(cfg, step)
        assert b["x0"].shape == (6, 8, 3, 64, 64) and b["gap"].shape == (6,)
        px = to_pixels(b["x0"])  # [B, F, H, W, 3]
        for i in range(6):
            gap = int(b["gap"][i])
            gaps.append(gap)
            # The same episode on both sides of the gap: the static scene (pixels not agent or ball) agrees.
            moving = lambda f: (np.abs(f.astype(int) - sim.AGENT_COLOR).sum(-1) < 30) | \
                (np.abs(f.astype(int) - sim.BALL_COLOR).sum(-1) < 30)
            still = ~moving(px[i, 0]) & ~moving(px[i, -1])
            assert np.array_equal(px[i, 0][still], px[i, -1][still])
            # No gap: the agent moves at most 2 px from the last sink frame to the next frame.
            if gap == 0:
                a, c = detect_color(px[i, S - 1:S + 1], sim.AGENT_COLOR)
                assert np.abs(a - c).max() <= 2 + 1e-6
    assert min(gaps) == 0 and max(gaps) > 8 and sum(g == 0 for g in gaps) in range(4, 21)
    # A rollout batch: the episode from frame 0, sink + d + 1 blocks.
    long = make_batch(cfg, 0, extra_blocks=3)
    assert long["x0"].shape[1] == S + 4 * 2 and (long["gap"] == 3 * 2 - 2).all()


def test_sink_rollout_is_the_engines_cache_and_a_gap_block_gets_no_loss():
    cfg = micro_config(clip_blocks=4, sink_blocks=2, rollout_p=1.0, rollout_max_blocks=3, max_start=30)
    tr = Trainer(cfg)
    tr.train_step()
    step = tr.step
    d = rollout_blocks_at(cfg, step)
    assert 1 <= d <= 3
    batch = tr.make_train_batch(step, torch.Generator().manual_seed(7))
    long = make_batch(cfg, step, extra_blocks=d)
    bf, S = 2, 4
    assert batch["x0"].shape[1] == 8 and batch["context"].shape[1] == 6
    assert torch.equal(batch["x0"][:, :S], long["x0"][:, :S]) and torch.equal(batch["x0"][:, -bf:], long["x0"][:, -bf:])
    # Naive: the true sink, then each block from pure noise given the sink and the block generated before it,
    # positions 0.. (relative), masked reference attention, clamped x0.
    g = torch.Generator().manual_seed(7)
    ctx = torch.cat([tr.text.encode(p) for p in long["prompts"]]).detach()
    sink, acts = long["x0"][:, :S], long["actions"]
    prev, prev_a = None, None
    meta = BlockCausalMeta(frame_tokens=64, block_frames=bf)
    with torch.no_grad():
        for j in range(d):
            parts = [sink] + ([prev] if prev is not None else [])
            a_parts = [acts[:, :S]] + ([prev_a] if prev_a is not None else [])
            a_new = acts[:, S + j * bf:S + (j + 1) * bf]
            x = torch.cat(parts + [torch.randn((2, bf, 3, 64, 64), generator=g)], 1)
            n_ctx = x.shape[1] - bf
            t = torch.tensor([0.0] * n_ctx + [1000.0] * bf).expand(2, -1)
            out = tr.dit(x, t, ctx, frame_pos=torch.arange(x.shape[1]).expand(2, -1), meta=meta,
                         backend=ReferenceBackend(), actions=torch.cat(a_parts + [a_new], 1))
            prev, prev_a = out[:, -bf:].clamp(-1, 1), a_new
    assert torch.allclose(batch["context"][:, S:], prev, atol=1e-4)
    assert torch.equal(batch["actions"], torch.cat([acts[:, :S], prev_a, acts[:, -bf:]], 1))
    # The first block after the sink is a target only when no gap lies before it: with the clean context given
    # apart, changing that block's target changes the loss only for clips without a gap.
    plain = make_batch(micro_config(clip_blocks=4, sink_blocks=2, max_start=30, p_no_gap=0.0, batch=2), 1)
    plain["gap"] = torch.tensor([3, 5])
    plain["context"] = plain["x0"][:, :-bf].clone()
    changed = {**plain, "x0": plain["x0"].clone()}
    changed["x0"][:, S:S + bf] = -changed["x0"][:, S:S + bf]
    loss = lambda b: tr.loss_on(b, torch.Generator().manual_seed(1))[0].item()
    assert loss(changed) == pytest.approx(loss(plain), rel=1e-6)
    nogap = lambda b: {**b, "gap": torch.zeros_like(b["gap"])}
    assert loss(nogap(changed)) != pytest.approx(loss(nogap(plain)), rel=1e-3)
