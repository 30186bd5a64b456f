"""Engine defaults resolved in one place (inferix/defaults.py): the rules, and that Engine, the CLI and the demo hub
build their engines with them."""
import argparse
from dataclasses import FrozenInstanceError
from types import SimpleNamespace

import pytest
import torch

from inferix.defaults import EngineDefaults, default_device, resolve_dtype, resolve_engine_defaults
from inferix.models.bundle import load_model
from inferix.sizing import pool_pages


def fake_bundle(window=12, sink=3, start=None):
    """What the resolver reads of a bundle: its window and sink, its start frames, its frame counts."""
    return SimpleNamespace(window=window, sink=sink, start_frames=lambda prompt, seed: start,
                           latent_frames=lambda n: (n + 3) // 4, pixel_frames=lambda n: 4 * n - 3,
                           sampling=SimpleNamespace(block_frames=3, independent_first_frame=False))


def test_device_and_dtype():
    assert default_device(cuda_available=True) == "cuda" and default_device(cuda_available=False) == "cpu"
    d = resolve_engine_defaults(cuda_available=False)
    assert d == EngineDefaults(device="cpu", dtype=torch.float32)  # no bundle: nothing else resolved
    assert resolve_engine_defaults(device="", cuda_available=True).device == "cuda"
    assert resolve_engine_defaults(cuda_available=True).dtype == torch.bfloat16
    assert resolve_engine_defaults(device="cuda:1", cuda_available=False).dtype == torch.bfloat16
    assert resolve_engine_defaults(device="cpu", dtype="bf16").dtype == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16 and resolve_dtype(torch.float64, "cuda") == torch.float64
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(FrozenInstanceError):
        d.window = 3


def test_window_and_sink_sentinels():
    b = fake_bundle(window=12, sink=3)
    r = lambda **kw: resolve_engine_defaults(b, device="cpu", **kw)  # noqa: E731
    assert (r().window, r().sink) == (12, 3)  # -1 and None: the model's
    assert (r(window=0).window, r(window=None).window, r(window=6, sink=1).window) == (None, None, 6)
    assert r(window=6, sink=1).sink == 1 and r(window=0).sink == 3
    plain = fake_bundle(window=None, sink=0)
    assert resolve_engine_defaults(plain, device="cpu").window is None
    bounded = resolve_engine_defaults(plain, device="cpu", unbounded_window=(12, 3))
    assert (bounded.window, bounded.sink) == (12, 3)
    assert resolve_engine_defaults(plain, device="cpu", sink=1, unbounded_window=(12, 3)).sink == 1
    assert resolve_engine_defaults(b, device="cpu", unbounded_window=(9, 1)).window == 12  # the model's wins


def test_pool_size():
    b = fake_bundle(window=12, sink=3)
    assert resolve_engine_defaults(b, device="cpu", max_sessions=3).kv_pages == 36  # windows
    assert resolve_engine_defaults(b, device="cpu", window=0, max_sessions=2).kv_pages == 48  # no window: 24 each
    assert resolve_engine_defaults(b, device="cpu", kv_pages=5).kv_pages == 5
    # sized for described sessions: 9 pixel frames -> 3 latent frames, one block, after 2 given latent frames
    sized = resolve_engine_defaults(fake_bundle(window=12, start=[0] * 5), device="cpu", max_sessions=2,
                                    num_frames=9, start_prompt="p")
    assert sized.kv_pages == pool_pages(fake_bundle(window=12), 12, 2, 9, 2) == 2 * 5
    assert resolve_engine_defaults(b, device="cpu", max_sessions=2, start_prompt="p").kv_pages == 24
    with pytest.raises(ValueError, match="without a frame limit need a window"):
        resolve_engine_defaults(b, device="cpu", window=0, start_prompt="p")


def test_engine_cli_and_hub_build_with_the_same_defaults():
    from app.hub import build_engine
    from inferix.cli import _build_engine
    from inferix.engine import Engine
    bundle = load_model("tiny")
    eng = Engine(bundle)
    assert (eng.device.type, eng.window, eng.sink, eng.kv.num_pages) == ("cpu", bundle.window, bundle.sink,
                                                                         4 * (bundle.window or 24))
    a = argparse.Namespace(device="cpu", window=-1, sink=None, kv_pages=None, dtype=None, model="tiny", vae=None,
                           text_encoder=None, sampling=None, decoder=None, decoder_weights=None, height=None,
                           width=None, attention=None, memory_limit_gib=None, overlap_decode=None, compile=None,
                           cuda_graphs=False, fp8=False, model_option=None, mirrors=None, corrector=None)
    cli = _build_engine(a, max_sessions=2, frames=9)
    want = resolve_engine_defaults(cli.bundle, device="cpu", max_sessions=2, num_frames=9, start_prompt="")
    assert (cli.window, cli.sink, cli.kv.num_pages) == (want.window, want.sink, want.kv_pages)
    cfg = SimpleNamespace(device="cpu", model="tiny", window=-1, sink=None, kv_pages=None, max_sessions=2,
                          max_frames=0, default_prompt=None, height=None, width=None, max_pixels=10 ** 9,
                          model_options=None, mirrors=None)
    hub = build_engine(cfg)
    want = resolve_engine_defaults(hub.bundle, device="cpu", max_sessions=2, unbounded_window=(12, 3),
                                   start_prompt="x")
    assert (hub.window, hub.sink, hub.kv.num_pages) == (want.window, want.sink, want.kv_pages)
    with pytest.raises(ValueError, match="max_frames 0"):
        build_engine(SimpleNamespace(**{**vars(cfg), "window": 0}))
