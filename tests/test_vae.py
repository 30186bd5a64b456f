"""Wan VAE wrapper: streamed decode equals one full decode, per-stream caches, original-name loading, encode."""
import numpy as np
import pytest
import torch

from inferix.models.checkpoints import CheckpointError
from inferix.models.vae import (TINY_VAE_CONFIG, WAN21_VAE_CONFIG, WanVAE, _diffusers_to_original_vae_key,
                                original_to_diffusers_vae_keys)


@pytest.fixture(scope="module")
def vae():
    return WanVAE.tiny(seed=0)


def _latents(n, seed, h=4, w=4):
    return torch.randn(1, n, 16, h, w, generator=torch.Generator().manual_seed(seed))


def _stream(vae, lat, sizes):
    state, parts, start = vae.new_stream(), [], 0
    for s in sizes:
        parts.append(vae.decode_block(state, lat[:, start:start + s]))
        start += s
    return state, parts


@pytest.mark.parametrize("sizes", [(3, 3, 1), (1, 2, 4), (1,) * 7])
def test_stream_equals_full_decode(vae, sizes):
    lat = _latents(7, seed=1)
    full = vae.decode(lat)
    state, parts = _stream(vae, lat, sizes)
    assert full.dtype == np.uint8 and full.shape == (1 + 4 * 6, 32, 32, 3)
    # block frame counts: the first block gives 1 + 4 (F - 1), later blocks 4 F
    assert [p.shape[0] for p in parts] == [1 + 4 * (sizes[0] - 1)] + [4 * s for s in sizes[1:]]
    streamed = np.concatenate(parts)
    assert streamed.shape == full.shape
    assert np.array_equal(streamed, full), np.abs(streamed.astype(int) - full.astype(int)).max()
    assert (state.latent_frames, state.pixel_frames) == (7, 25)
    assert full.std() > 10  # random weights still give a spread of pixel values, not a saturated image


def test_interleaved_streams_do_not_disturb_each_other(vae):
    a, b = _latents(5, seed=2), _latents(5, seed=3)
    sa, sb = vae.new_stream(), vae.new_stream()
    pa, pb = [], []
    for lo, hi in ((0, 2), (2, 3), (3, 5)):
        pa.append(vae.decode_block(sa, a[:, lo:hi]))
        pb.append(vae.decode_block(sb, b[:, lo:hi]))
        vae.decode(_latents(2, seed=4))  # a full decode in between must not touch the streams either
    assert np.array_equal(np.concatenate(pa), vae.decode(a))
    assert np.array_equal(np.concatenate(pb), vae.decode(b))
    assert not np.array_equal(np.concatenate(pa), np.concatenate(pb))


def test_stream_cache_matters(vae):
    # decoding the second block on a fresh stream (no cache) gives other frames: the test above is not vacuous
    lat = _latents(4, seed=5)
    _, parts = _stream(vae, lat, (2, 2))
    fresh = vae.decode_block(vae.new_stream(), lat[:, 2:4])
    assert fresh.shape[0] == 5 and parts[1].shape[0] == 8
    assert not np.array_equal(fresh[-4:], parts[1][-4:])


def test_ratios_and_frame_counts(vae):
    assert (vae.temporal_ratio, vae.spatial_ratio, vae.latent_channels) == (4, 8, 16)
    assert [vae.pixel_frames(n) for n in (0, 1, 2, 21)] == [0, 1, 5, 81]
    assert [vae.latent_frames(n) for n in (1, 5, 81, 84)] == [1, 2, 21, 21]
    with pytest.raises(ValueError):
        vae.latent_frames(0)


def test_normalisation_matches_wan_pipeline_formula(vae):
    z = torch.randn(1, 16, 3, 2, 2)
    mean = torch.tensor(vae.model.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.model.config.latents_std).view(1, 16, 1, 1, 1)
    want = ((z - mean) * inv_std).permute(0, 2, 1, 3, 4)  # diffusers Wan pipelines: (z - mean) * (1 / std)
    got = vae.normalize(z)
    assert got.shape == (1, 3, 16, 2, 2)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(vae.denormalize(got), z, atol=1e-5)


def test_bf16_vae_keeps_float32_normalisation():
    v = WanVAE.tiny(seed=0).to(torch.bfloat16)
    assert v.dtype == torch.bfloat16 and v.latents_std.dtype == torch.float32
    lat = _latents(2, seed=11)
    z = v.denormalize(lat)
    assert z.dtype == torch.bfloat16
    frames = v.decode_block(v.new_stream(), lat)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8


def test_encode(vae):
    frames = np.random.default_rng(0).integers(0, 256, size=(9, 16, 24, 3), dtype=np.uint8)
    lat = vae.encode(frames)
    assert lat.shape == (1, 3, 16, 2, 3)
    x = torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
    with torch.no_grad():
        mu = vae.model.encode(x).latent_dist.mean  # [1, 16, 3, 2, 3]
    mean = torch.tensor(vae.model.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.model.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.allclose(lat, ((mu - mean) / std).permute(0, 2, 1, 3, 4), atol=1e-5)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(frames[:8])
    with pytest.raises(TypeError, match="uint8"):
        vae.encode(frames.astype(np.float32))
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(frames[:, :12])


def test_decode_block_input_errors(vae):
    s = vae.new_stream()
    with pytest.raises(ValueError, match="16"):
        vae.decode_block(s, torch.zeros(1, 2, 8, 4, 4))
    with pytest.raises(ValueError, match="batch"):
        vae.decode_block(s, torch.zeros(2, 2, 16, 4, 4))
    with pytest.raises(TypeError, match="VAEStream"):
        vae.decode_block([], torch.zeros(1, 2, 16, 4, 4))


# ---------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------
def test_original_names_agree_with_diffusers_converter():
    # Our structural name map for the released Wan2.1 VAE, checked against diffusers' own hand-written
    # converter: original names made by our map must convert back to exactly the diffusers names.
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    with torch.device("meta"):
        model = AutoencoderKLWan(**WAN21_VAE_CONFIG)
    keys = list(model.state_dict())
    names = original_to_diffusers_vae_keys(keys, WAN21_VAE_CONFIG)
    assert len(names) == len(keys)
    converted = convert_wan_vae_to_diffusers({orig: orig for orig in names})
    assert converted == {d: o for o, d in names.items()}  # {diffusers name: value = our original name}
    # a few names as they appear in Wan2.1_VAE.pth
    for orig in ("conv1.weight", "conv2.bias", "encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma",
                 "encoder.middle.1.to_qkv.weight", "decoder.upsamples.3.resample.1.weight",
                 "decoder.upsamples.3.time_conv.weight", "decoder.upsamples.4.shortcut.weight",
                 "decoder.head.2.weight"):
        assert orig in names, orig


def test_from_original_tiny_roundtrip(vae, tmp_path):
    sd = {_diffusers_to_original_vae_key(k, TINY_VAE_CONFIG): v.clone() for k, v in vae.model.state_dict().items()}
    assert "decoder.upsamples.2.resample.1.weight" in sd  # tiny layout: 2 resblocks + upsampler per stage
    torch.save(sd, tmp_path / "tiny_vae.pth")
    loaded = WanVAE.from_original(tmp_path / "tiny_vae.pth", config=TINY_VAE_CONFIG)
    lat = _latents(3, seed=6)
    assert np.array_equal(loaded.decode(lat), vae.decode(lat))
    assert np.array_equal(WanVAE.load(tmp_path / "tiny_vae.pth", config=TINY_VAE_CONFIG).decode(lat), vae.decode(lat))


def test_from_pretrained_dir(vae, tmp_path):
    vae.model.save_pretrained(tmp_path / "vae")
    lat = _latents(2, seed=7)
    for path in (tmp_path / "vae", tmp_path):  # the VAE dir itself or a pipeline dir holding vae/
        assert np.array_equal(WanVAE.from_pretrained(path).decode(lat), vae.decode(lat))


def test_bad_vae_checkpoints(vae, tmp_path):
    sd = {_diffusers_to_original_vae_key(k, TINY_VAE_CONFIG): v for k, v in vae.model.state_dict().items()}
    broken = dict(sd)
    del broken["decoder.head.2.weight"]
    broken["decoder.bogus.weight"] = torch.zeros(1)
    broken["conv2.weight"] = torch.zeros(3, 3, 1, 1, 1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as e:
        WanVAE.from_original(tmp_path / "broken.pth", config=TINY_VAE_CONFIG)
    msg = str(e.value)
    assert "broken.pth" in msg and "decoder.conv_out.weight" in msg and "decoder.bogus.weight" in msg
    assert "post_quant_conv.weight" in msg and "(3, 3, 1, 1, 1)" in msg
    torch.save({"conv1.weight": {1, 2}}, tmp_path / "set.pth")
    with pytest.raises(CheckpointError, match="set"):
        WanVAE.from_original(tmp_path / "set.pth", config=TINY_VAE_CONFIG)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        WanVAE.load(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="unknown AutoencoderKLWan config keys"):
        WanVAE.from_original(tmp_path / "broken.pth", config={"base_dimension": 8})
