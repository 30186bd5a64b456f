"""Reference backends with randomly initialised models of the protocol's architectures (no downloads)."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inferix.lvbench.amt import AMTS, BidirCorrelation, pad16, unpad, warp
from inferix.lvbench.backends import build_scorers, feature_consistency, missing_reference_weights
from inferix.lvbench.musiq import MUSIQ, MusiqConfig, _hashed_positions, multiscale_patches
from lvbench_synth import steady, texture

torch.set_num_threads(1)


def tiny_clip(proj=16):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=proj))


def tiny_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    return ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8), add_pooling_layer=False)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """A --weights folder in the documented layout, filled with random models."""
    d = tmp_path_factory.mktemp("weights")
    tiny_clip().save_pretrained(d / "clip-vit-base-patch32")
    tiny_clip(proj=12).save_pretrained(d / "clip-vit-large-patch14")
    tiny_vit().save_pretrained(d / "dino-vitb16")
    os.makedirs(d / "aesthetic")
    torch.save(torch.nn.Linear(12, 1).state_dict(), d / "aesthetic" / "sa_0_4_vit_l_14_linear.pth")
    os.makedirs(d / "amt-s")
    torch.manual_seed(0)
    torch.save({"state_dict": AMTS().state_dict()}, d / "amt-s" / "amt-s.pth")
    os.makedirs(d / "musiq")
    torch.save({"params": MUSIQ().state_dict()}, d / "musiq" / "musiq_spaq_ckpt.pth")
    return str(d)


def test_reference_scorers_load_from_weights_dir(weights_dir):
    s = build_scorers(["clarity", "motion", "aesthetic", "subject", "background", "dynamic"], "reference",
                      weights_dir)
    assert {m: x.backend for m, x in s.items()} == {
        "clarity": "reference:musiq-spaq", "motion": "reference:amt-s",
        "aesthetic": "reference:laion-aesthetic-clip-vit-l14", "subject": "reference:dino-vitb16",
        "background": "reference:clip-vit-b32", "dynamic": "weightfree:mean-frame-difference"}
    v = steady(t=3)[:, :32, :48]
    # identical frames: features are identical, so both consistency terms are exactly 1
    same = np.repeat(v[:1], 3, 0)
    assert s["subject"](same) == pytest.approx(1.0, abs=1e-5)
    assert s["background"](same) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= s["subject"](v) <= 1.0
    for m in ("clarity", "motion", "aesthetic"):
        assert np.isfinite(s[m](v[:1] if m == "clarity" else v)), m
    assert 0.0 <= s["motion"](v) <= 1.0


@pytest.mark.slow
def test_reference_scorers_stream_frame_by_frame(weights_dir):
    """Fed one frame at a time (CLIP/DINO in batches of 16 cut as in the whole chunk), the scores are identical."""
    from inferix.lvbench.vde import score_stream, score_video
    from lvbench_synth import scene_cut

    s = build_scorers(["clarity", "motion", "aesthetic", "subject", "background"], "reference", weights_dir)
    v = scene_cut(t=41, cut_at=23)[:, :40, :56]
    batched = {m: s[m] for m in ("aesthetic", "subject", "background")}
    got, n = score_stream(iter(v), len(v), batched, 2)  # 2 chunks of 20 frames, 1 left over
    assert n == 41 and got == score_video(v, batched, 2)
    per_frame = {m: s[m] for m in ("clarity", "motion")}  # MUSIQ is slow on a CPU: short chunks
    got, n = score_stream(iter(v[:11]), 11, per_frame, 2)
    assert n == 11 and got == score_video(v[:11], per_frame, 2)


def test_aesthetic_is_head_on_normalised_clip_embedding(weights_dir):
    from transformers import CLIPVisionModelWithProjection

    from inferix.lvbench.backends import clip_preprocess, load_state_dict

    s = build_scorers(["aesthetic"], "reference", weights_dir)["aesthetic"]
    clip = CLIPVisionModelWithProjection.from_pretrained(os.path.join(weights_dir, "clip-vit-large-patch14"))
    sd = load_state_dict(os.path.join(weights_dir, "aesthetic", "sa_0_4_vit_l_14_linear.pth"))
    frames = texture(40, 56)[None].repeat(2, 0)
    with torch.no_grad():
        e = clip(pixel_values=clip_preprocess(frames, clip.config.image_size)).image_embeds
        want = ((F.normalize(e, dim=-1) @ sd["weight"].T + sd["bias"]) / 10).mean()
    assert s(frames) == pytest.approx(float(want), rel=1e-5)


def test_backend_choice_and_missing_weights(tmp_path):
    auto = build_scorers(["clarity", "subject"], "auto", None)
    assert all(x.backend.startswith("weightfree:") for x in auto.values())
    with pytest.raises(FileNotFoundError, match="dino-vitb16"):
        build_scorers(["subject"], "reference", str(tmp_path))
    assert missing_reference_weights("clarity", str(tmp_path)) == [str(tmp_path / "musiq")]
    os.makedirs(tmp_path / "musiq")
    with pytest.raises(FileNotFoundError, match="exactly one"):
        build_scorers(["clarity"], "reference", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        build_scorers(["clarity"], "auto", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown metric"):
        build_scorers(["blur"])


def test_feature_consistency_formula():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # t=2: prev cos 0, first cos 0 -> 0; t=3: prev cos 1/sqrt2, first cos 1/sqrt2 -> 1/sqrt2
    assert feature_consistency(f) == pytest.approx((0 + 2 ** -0.5) / 2)
    neg = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert feature_consistency(neg) == 0.0  # negative similarities are clipped at 0


# ------------------------------------------------------------------------------------------------ MUSIQ
def test_musiq_matches_published_size():
    n = sum(p.numel() for p in MUSIQ().parameters())
    assert 26.5e6 <= n <= 27.5e6  # the MUSIQ paper lists 27 M parameters


def test_musiq_hashed_positions_are_nearest_neighbour():
    for ch, cw in [(3, 4), (10, 10), (12, 17), (5, 7)]:
        rows = F.interpolate(torch.arange(10.0)[None, None], size=ch, mode="nearest")[0, 0]
        cols = F.interpolate(torch.arange(10.0)[None, None], size=cw, mode="nearest")[0, 0]
        want = (rows[:, None] * 10 + cols[None, :]).reshape(-1).long()
        assert torch.equal(_hashed_positions(10, ch, cw), want)


def test_musiq_multiscale_patches_layout():
    cfg = MusiqConfig()
    img = torch.rand(1, 3, 64, 96)
    tok, spatial, scale, mask = multiscale_patches(img, cfg)
    # 224 scale: 149x224 -> 5x7 = 35 real of 49; 384 scale: 256x384 -> 8x12 = 96 of 144; native 2x3 = 6
    assert tok.shape == (1, 49 + 144 + 6, 3, 32, 32)
    assert mask[0, :49].sum() == 35 and mask[0, 49:193].sum() == 96 and mask[0, 193:].all()
    assert scale[0, 0] == 0 and scale[0, 49] == 1 and scale[0, -1] == 2
    # native-scale patches are the image tiles in row-major order
    assert torch.equal(tok[0, 193 + 4], img[0, :, 32:64, 32:64])
    assert spatial[0, 193 + 4] == (1 * 10 // 2) * 10 + (1 * 10 // 3)


def test_musiq_padding_tokens_do_not_change_the_score():
    torch.manual_seed(0)
    cfg = MusiqConfig(hidden_size=64, mlp_dim=96, num_heads=4, num_layers=2)
    enc = MUSIQ(cfg).transformer_encoder.eval()
    x = torch.randn(1, 10, 64)
    spatial = torch.arange(10)[None]
    scale = torch.zeros(1, 10, dtype=torch.long)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    y1 = enc(x, spatial, scale, mask)[:, 0]
    x2 = x.clone()
    x2[:, 6:] = torch.randn(1, 4, 64) * 10
    y2 = enc(x2, spatial, scale, mask)[:, 0]
    assert torch.allclose(y1, y2, atol=1e-5)
    mask[0, 7] = True  # unmasking one changed token must change the output
    assert not torch.allclose(enc(x2, spatial, scale, mask)[:, 0], y1, atol=1e-4)


def test_musiq_distribution_head_gives_mean_opinion_score():
    torch.manual_seed(0)
    m = MUSIQ(MusiqConfig(hidden_size=64, mlp_dim=96, num_heads=4, num_layers=1, num_classes=10)).eval()
    with torch.no_grad():
        q = m(torch.rand(2, 3, 40, 56))
    assert q.shape == (2,) and ((q > 1) & (q < 10)).all()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m(torch.rand(3, 40, 56))


# ------------------------------------------------------------------------------------------------ AMT-S
def test_amt_s_matches_published_size():
    n = sum(p.numel() for p in AMTS().parameters())
    assert 2.985e6 <= n <= 2.995e6  # the AMT paper lists AMT-S at 2.99 M parameters


def test_warp_and_correlation():
    img = torch.rand(1, 3, 8, 10)
    assert torch.allclose(warp(img, torch.zeros(1, 2, 8, 10)), img, atol=1e-6)
    flow = torch.zeros(1, 2, 8, 10)
    flow[:, 0] = 2.0  # sample two pixels to the right
    assert torch.allclose(warp(img, flow)[..., :8], img[..., 2:], atol=1e-6)
    f0, f1 = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    corr = BidirCorrelation(f0, f1, levels=2, radius=1)
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    coords = torch.stack([xs, ys])[None]
    c0, c1 = corr(coords, coords)
    assert c0.shape == (1, 2 * 9, 6, 6)
    # window centre at level 0 (index 4 of 3x3) is the plain dot product of the two features / sqrt(C)
    assert torch.allclose(c0[0, 4], (f0[0] * f1[0]).sum(0) / 2.0, atol=1e-5)
    assert torch.allclose(c1[0, 4], (f0[0] * f1[0]).sum(0) / 2.0, atol=1e-5)
    # window offset (+1 on the first window axis) moves along x
    assert torch.allclose(c0[0, 7, :, :5], (f0[0, :, :, :5] * f1[0, :, :, 1:]).sum(0) / 2.0, atol=1e-5)


def test_amt_forward_and_padding():
    torch.manual_seed(0)
    m = AMTS().eval()
    a, pads = pad16(torch.rand(1, 3, 30, 40))
    assert a.shape[-2:] == (64, 64) and unpad(a, pads).shape[-2:] == (30, 40)
    b, pads = pad16(torch.rand(1, 3, 70, 100))
    assert b.shape[-2:] == (80, 112) and torch.equal(unpad(b, pads), b[..., 5:75, 6:106])
    with torch.no_grad():
        y = m(a, a.flip(-1), torch.tensor(0.5))
    assert y.shape == a.shape and y.min() >= 0 and y.max() <= 1
    with pytest.raises(ValueError, match="divisible by 16"):
        m(torch.rand(1, 3, 64, 72), torch.rand(1, 3, 64, 72), torch.tensor(0.5))
