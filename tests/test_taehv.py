"""TAEHV decoder: the published key layout loads, block-by-block streaming equals one decode, the layers do what
the architecture says (checked against a functional re-implementation), lighttae scaling, load_model's option."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inferix.models.taehv import TAEHVDecoder, wan21_latent_stats
from inferix.models.tensor_files import CheckpointError


# ---------------------------------------------------------------------------------------------------
# the published layout, written out from the architecture (not read from the module)
# ---------------------------------------------------------------------------------------------------
def _conv(shapes, key, n_out, n_in, k=3, bias=True):
    shapes[f"{key}.weight"] = (n_out, n_in, k, k)
    if bias:
        shapes[f"{key}.bias"] = (n_out,)


def _memblock(shapes, key, n):  # conv.0 / conv.2 / conv.4 of an nn.Sequential with ReLUs between; no skip conv
    _conv(shapes, f"{key}.conv.0", n, 2 * n)
    _conv(shapes, f"{key}.conv.2", n, n)
    _conv(shapes, f"{key}.conv.4", n, n)


def published_layout(encoder=True):
    """{key: shape} of taew2_1.pth: encoder = conv, relu, then 3 x (TPool, stride-2 conv, 3 MemBlocks), conv;
    decoder = clamp, conv, relu, then 3 x (3 MemBlocks, upsample, TGrow, conv), relu, conv."""
    s = {}
    if encoder:
        _conv(s, "encoder.0", 64, 3)
        for j, stride in enumerate((2, 2, 1)):
            base = 2 + 5 * j  # 2, 7, 12
            s[f"encoder.{base}.conv.weight"] = (64, 64 * stride, 1, 1)
            _conv(s, f"encoder.{base + 1}", 64, 64, bias=False)
            for m in range(3):
                _memblock(s, f"encoder.{base + 2 + m}", 64)
        _conv(s, "encoder.17", 16, 64)
    _conv(s, "decoder.1", 256, 16)
    widths, strides = (256, 128, 64, 64), (1, 2, 2)
    for j in range(3):
        base, n = 3 + 6 * j, widths[j]  # MemBlocks at 3-5, 9-11, 15-17
        for m in range(3):
            _memblock(s, f"decoder.{base + m}", n)
        s[f"decoder.{base + 4}.conv.weight"] = (n * strides[j], n, 1, 1)  # TGrow, after the upsample at base + 3
        _conv(s, f"decoder.{base + 5}", widths[j + 1], n, bias=False)
    _conv(s, "decoder.22", 3, 64)
    return s


def random_state_dict(seed=0, encoder=True, dtype=torch.float32):
    """He-scaled random tensors in the published layout (so decoded frames spread over [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in published_layout(encoder).items():
        if k.endswith(".bias"):
            t = 0.05 * torch.randn(shape, generator=g) + (0.5 if k == "decoder.22.bias" else 0.0)
        else:
            t = torch.randn(shape, generator=g) * (2.0 / np.prod(shape[1:])) ** 0.5
        sd[k] = t.to(dtype)
    return sd


# ---------------------------------------------------------------------------------------------------
# a functional re-implementation of the architecture, straight from the state dict
# ---------------------------------------------------------------------------------------------------
def _f_conv(sd, x, key, stride=1):
    w = sd[f"{key}.weight"].to(x.dtype)
    b = sd.get(f"{key}.bias")
    return F.conv2d(x, w, None if b is None else b.to(x.dtype), stride=stride, padding=w.shape[-1] // 2)


def _f_mem(sd, x, key):  # relu(conv(cat(x_t, x_{t-1})) + x_t), x_{-1} = 0
    past = torch.cat([torch.zeros_like(x[:1]), x[:-1]])
    h = F.relu(_f_conv(sd, torch.cat([x, past], 1), f"{key}.conv.0"))
    h = F.relu(_f_conv(sd, h, f"{key}.conv.2"))
    return F.relu(_f_conv(sd, h, f"{key}.conv.4") + x)


def reference_decode(sd, z):
    """latents [F, 16, h, w] (as the checkpoint reads them) -> frames [4F - 3, 3, 8h, 8w] in [0, 1]."""
    x = F.relu(_f_conv(sd, 3 * torch.tanh(z / 3), "decoder.1"))
    for base in (3, 9, 15):
        for m in range(3):
            x = _f_mem(sd, x, f"decoder.{base + m}")
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        w = sd[f"decoder.{base + 4}.conv.weight"].to(x.dtype)
        s = w.shape[0] // w.shape[1]
        x = F.conv2d(x, w)  # [T, s * C, H, W]: channel group j becomes frame t * s + j
        T, _, H, W = x.shape
        x = x.reshape(T, s, -1, H, W).reshape(T * s, -1, H, W)
        x = _f_conv(sd, x, f"decoder.{base + 5}")
    x = _f_conv(sd, F.relu(x), "decoder.22")
    return x.clamp(0, 1)[3:]


def reference_encode(sd, v):
    """frames [T, 3, H, W] in [0, 1], T a multiple of 4 -> latents [T / 4, 16, H / 8, W / 8]."""
    x = F.relu(_f_conv(sd, v, "encoder.0"))
    for j, stride in enumerate((2, 2, 1)):
        base = 2 + 5 * j
        T, C, H, W = x.shape
        x = F.conv2d(x.reshape(T // stride, stride * C, H, W), sd[f"encoder.{base}.conv.weight"].to(x.dtype))
        x = _f_conv(sd, x, f"encoder.{base + 1}", stride=2)
        for m in range(3):
            x = _f_mem(sd, x, f"encoder.{base + 2 + m}")
    return _f_conv(sd, x, "encoder.17")


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd():
    return random_state_dict(seed=0)


@pytest.fixture(scope="module")
def files(sd, tmp_path_factory):
    """The same random weights as taew2_1.pth (fp16, as published) and lighttaew2_1.safetensors (fp32)."""
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("taehv")
    torch.save({k: v.half() for k, v in sd.items()}, root / "taew2_1.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "lighttaew2_1.safetensors"))
    return root


@pytest.fixture(scope="module")
def dec(files):
    return TAEHVDecoder.load(files / "taew2_1.pth")


def _latents(n, seed, h=4, w=6):
    return torch.randn(1, n, 16, h, w, generator=torch.Generator().manual_seed(seed))


def _stream(dec, lat, sizes, as_float=True):
    state, parts, start = dec.new_stream(), [], 0
    for s in sizes:
        block = lat[:, start:start + s]
        parts.append(dec.decode_block_float(state, block) if as_float else dec.decode_block(state, block))
        start += s
    return state, parts


# ---------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,variant", [("taew2_1.pth", "taehv"), ("lighttaew2_1.safetensors", "lighttae")])
def test_published_layout_loads(files, sd, name, variant):
    d = TAEHVDecoder.load(files / name)
    assert d.variant == variant and d.has_encoder and d.dtype == torch.float32
    own = d.state_dict()
    assert {k: tuple(v.shape) for k, v in own.items()} == published_layout()
    for k, v in sd.items():
        ref = v.half().float() if name.endswith(".pth") else v
        assert torch.equal(own[k], ref), k


def test_decoder_only_file_and_tgrow_with_more_channels(sd, tmp_path):
    part = {k: v for k, v in sd.items() if k.startswith("decoder.")}
    wide = torch.randn(512, 256, 1, 1)  # a TGrow trained with 2x upsampling where Wan2.1's has none
    part["decoder.7.conv.weight"] = wide
    torch.save(part, tmp_path / "taew2_1_decoder.pth")
    d = TAEHVDecoder.load(tmp_path / "taew2_1_decoder.pth")
    assert not d.has_encoder and not any(k.startswith("encoder.") for k in d.state_dict())
    assert torch.equal(d.state_dict()["decoder.7.conv.weight"], wide[-256:])  # the channels of the later frame
    assert d.decode(_latents(2, seed=0)).shape == (5, 32, 48, 3)
    with pytest.raises(ValueError, match="no encoder"):
        d.encode(np.zeros((5, 32, 32, 3), np.uint8))


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("decoder.22.bias"), r"missing keys \(1\): decoder\.22\.bias"),
    (lambda s: s.pop("encoder.17.weight"), r"missing keys \(1\): encoder\.17\.weight"),
    (lambda s: s.__setitem__("decoder.23.weight", torch.zeros(3)), r"unexpected keys \(1\): decoder\.23\.weight"),
    (lambda s: s.__setitem__("decoder.1.weight", torch.zeros(256, 48, 3, 3)),
     r"shape mismatches \(1\): decoder\.1\.weight \(256, 48, 3, 3\) \(expected \(256, 16, 3, 3\)\)"),
], ids=["missing-decoder-key", "missing-encoder-key", "unexpected-key", "wrong-shape"])
def test_bad_checkpoint_one_line_error(sd, tmp_path, edit, match):
    bad = dict(sd)
    edit(bad)
    path = tmp_path / "taew2_1.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match=match) as e:
        TAEHVDecoder.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        TAEHVDecoder.load(tmp_path / "taew2_1.pth")
    torch.save({"decoder.1.weight": 3}, tmp_path / "ints.pth")
    with pytest.raises(CheckpointError, match=r"ints\.pth.*non-tensor values.*decoder\.1\.weight"):
        TAEHVDecoder.load(tmp_path / "ints.pth")
    many = {f"x.{i}": torch.zeros(1) for i in range(9)}
    torch.save(many, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): decoder\.1\.bias, .*, \.\.\. \| unexpected"):
        TAEHVDecoder.load(tmp_path / "other.pth")


# ---------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [(1, 3, 3), (3, 3, 3), (2, 5, 1, 1)])
def test_stream_equals_full_decode(dec, sizes):
    n = sum(sizes)
    lat = _latents(n, seed=1)
    full = dec.decode_float(lat)
    assert full.shape == (1 + 4 * (n - 1), 3, 32, 48) and full.dtype == torch.float32
    state, parts = _stream(dec, lat, sizes)
    assert [p.shape[0] for p in parts] == [1 + 4 * (sizes[0] - 1)] + [4 * s for s in sizes[1:]]
    assert [dec.pixel_frames(sum(sizes[:i + 1])) for i in range(len(sizes))] == \
        list(np.cumsum([p.shape[0] for p in parts]))
    assert torch.equal(torch.cat(parts), full), (torch.cat(parts) - full).abs().max()  # bit for bit
    assert (state.latent_frames, state.pixel_frames) == (n, full.shape[0])
    _, u8 = _stream(dec, lat, sizes, as_float=False)
    assert all(p.dtype == np.uint8 and p.shape[1:] == (32, 48, 3) for p in u8)
    assert np.array_equal(np.concatenate(u8), dec.decode(lat))
    assert full.std() > 0.05  # the weights give a spread of pixel values


@pytest.fixture(scope="module")
def dec64(files):
    """The same weights in float64: compared with the float64 reference, only the float32 output rounding is left."""
    return TAEHVDecoder.load(files / "taew2_1.pth", dtype=torch.float64)


def _sd64(sd):
    return {k: v.half().double() for k, v in sd.items()}  # the values taew2_1.pth holds (fp16)


def test_matches_functional_reference(dec64, sd):
    lat = _latents(3, seed=2)
    ref = reference_decode(_sd64(sd), lat[0].double())
    got = dec64.decode_float(lat)
    assert got.shape == ref.shape == (9, 3, 32, 48) and got.dtype == torch.float32
    assert (got.double() - ref).abs().max() < 1e-6
    assert ref.std() > 0.05


def test_stream_memory_matters_and_forks(dec):
    lat = _latents(4, seed=3)
    state, first = _stream(dec, lat[:, :2], [2])
    fresh = dec.decode_block_float(dec.new_stream(), lat[:, 2:])
    fork = copy.deepcopy(state)
    a = dec.decode_block_float(state, lat[:, 2:])
    b = dec.decode_block_float(fork, lat[:, 2:])
    assert torch.equal(a, b)  # a deep-copied state (the engine's fork) continues the same way
    assert a.shape[0] == 8 and fresh.shape[0] == 5
    assert (a[-5:] - fresh).abs().max() > 1e-3  # without the memory, the continuation is another video
    with pytest.raises(ValueError, match="a stream keeps one latent size"):
        dec.decode_block(state, _latents(1, seed=0, h=6))
    with pytest.raises(ValueError, match=r"latents must be \[B, F, 16, h, w\]"):
        dec.decode_block(dec.new_stream(), torch.zeros(1, 2, 48, 4, 4))
    assert dec.decode_block(dec.new_stream(), lat[:, :0]).shape == (0, 32, 48, 3)


def test_batched_frames_agree(files, dec64):
    many = TAEHVDecoder.load(files / "taew2_1.pth", frames_per_call=None, dtype=torch.float64)
    lat = _latents(3, seed=4)
    assert (dec64.decode_float(lat) - many.decode_float(lat)).abs().max() < 1e-6


def test_lighttae_reads_raw_latents(files):
    plain = TAEHVDecoder.load(files / "taew2_1.pth", variant="taehv")
    light = TAEHVDecoder.load(files / "taew2_1.pth", variant="lighttae")
    mean, std = wan21_latent_stats()
    lat = _latents(3, seed=5)
    raw = lat * std.view(1, 1, -1, 1, 1) + mean.view(1, 1, -1, 1, 1)
    assert (light.decode_float(lat) - plain.decode_float(raw)).abs().max() < 1e-6
    frames = (np.random.default_rng(0).random((5, 32, 48, 3)) * 255).astype(np.uint8)
    z_plain, z_light = plain.encode(frames), light.encode(frames)
    assert torch.allclose(z_light, (z_plain - mean.view(1, 1, -1, 1, 1)) / std.view(1, 1, -1, 1, 1), atol=1e-5)


def test_latent_stats_are_the_wan_vaes():
    from inferix.models.vae import WanVAE
    vae = WanVAE.tiny()
    mean, std = wan21_latent_stats()
    assert torch.equal(mean, vae.latents_mean) and torch.equal(std, vae.latents_std)


def test_encode(dec, dec64, sd):
    frames = (np.random.default_rng(1).random((9, 32, 48, 3)) * 255).astype(np.uint8)
    z = dec.encode(frames)
    assert z.shape == (1, 3, 16, 4, 6) and z.dtype == torch.float32
    v = torch.as_tensor(frames).double().permute(0, 3, 1, 2) / 255
    v = torch.cat([v, v[-1:].expand(3, -1, -1, -1)])  # padded at the end with the last frame to 12
    ref = reference_encode(_sd64(sd), v)
    assert (dec64.encode(frames)[0].double() - ref).abs().max() < 1e-6 * ref.abs().max()
    assert (z[0].double() - ref).abs().max() < 1e-5 * ref.abs().max()
    assert dec.latent_frames(9) == 3 and dec.pixel_frames(3) == 9
    with pytest.raises(ValueError, match="frame count 8 is not 1 \\+ 4k"):
        dec.encode(frames[:8])
    with pytest.raises(ValueError, match="multiple of 8"):
        dec.encode(np.zeros((5, 30, 48, 3), np.uint8))


# ---------------------------------------------------------------------------------------------------
# load_model(decoder="taehv") and the engine
# ---------------------------------------------------------------------------------------------------
def test_load_model_decoder_option(files):
    from inferix.engine import Engine
    from inferix.models.bundle import load_model
    b = load_model("tiny", decoder="taehv", decoder_weights=files / "lighttaew2_1.safetensors")
    assert isinstance(b.decoder, TAEHVDecoder) and b.decoder.variant == "lighttae"
    assert b.spatial_ratio == 8 and b.pixel_frames(3) == 9 and b.latent_frames(9) == 3
    eng = Engine(b, max_sessions=1, kv_pages=12)
    start = (np.random.default_rng(0).random((5, 64, 64, 3)) * 255).astype(np.uint8)  # -> 2 latent frames
    blocks = list(eng.generate("a red ball", num_frames=13, seed=0, init_frames=start))
    assert [blk.shape for blk in blocks] == [(12, 64, 64, 3), (1, 64, 64, 3)]  # continues the primed stream
    assert all(blk.dtype == np.uint8 for blk in blocks)
    with pytest.raises(ValueError, match="needs decoder_weights"):
        load_model("tiny", decoder="taehv")
    with pytest.raises(ValueError, match="unknown decoder 'tae'"):
        load_model("tiny", decoder="tae", decoder_weights=files / "taew2_1.pth")
    with pytest.raises(ValueError, match="without decoder='taehv'"):
        load_model("tiny", decoder_weights=files / "taew2_1.pth")
    with pytest.raises(FileNotFoundError, match="decoder weights not found"):
        load_model("tiny", decoder="taehv", decoder_weights=files / "nope.pth")
    with pytest.raises(ValueError, match="'toyworld' has a PixelDecoder and 3 latent channels"):
        load_model("toyworld", decoder="taehv", decoder_weights=files / "taew2_1.pth")


def test_snapshot_keeps_the_taehv_stream_state(files, tmp_path):
    """A session decoded by TAEHV continues bit for bit from a snapshot: the decoder's causal memory travels."""
    from inferix.engine import Engine
    from inferix.models.bundle import load_model

    def engine():
        return Engine(load_model("tiny", decoder="taehv", decoder_weights=files / "taew2_1.pth"), window=6,
                      max_sessions=1, kv_pages=12)

    def run(eng, sess, n):
        out = []
        while len(out) < n or not sess.at_block_boundary:
            assert eng.step()
            out.extend(sess.poll())
        return out

    eng = engine()
    s = eng.open_session("a red ball", num_frames=None, seed=2)
    run(eng, s, 2)
    s.snapshot(tmp_path / "taehv.safetensors")
    want = run(eng, s, 2)
    eng2 = engine()
    r = eng2.restore(tmp_path / "taehv.safetensors")
    r.resume()
    got = run(eng2, r, 2)
    assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))
