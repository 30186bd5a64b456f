"""Matrix-Game 2.0 through the engine: the reference rollout, incremental equals whole-clip for every variant,
batched sessions, forks, loading the release layout, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from inferix.cli import main
from inferix.engine import Engine
from inferix.fixture import verify_fixture
from inferix.models.bundle import load_model
from inferix.models.matrixgame.bundle import VARIANTS, build_bundle, load_release, release_config
from inferix.models.tensor_files import CheckpointError

from matrix_game_utils import random_inputs, tiny_config, tiny_model, write_fixture

MG = Path(__file__).parent / "fixtures" / "matrix_game_tiny"


# ---- the reference rollout -----------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["reference", "sdpa", "triton"])
def test_reference_rollout_replays(attention):
    r = verify_fixture(MG, attention=attention)
    assert r["passed"], r
    assert r["latents_max_abs_err"] < 1e-5 and r["x0_max_abs_err"] < 1e-5
    for name in ("kv_layer0_k", "kv_keyboard_layer0_k", "kv_keyboard_layer0_v", "kv_mouse_layer0_k",
                 "kv_mouse_layer0_v", "debug_call0_layer0_action_out"):
        assert r[f"{name}_max_abs_err"] < 1e-5, name
    assert len(r["x0_errors"]) == 12 and r["pages_in_use_after"] == 0


def test_verify_fixture_command_and_a_failing_tolerance(capsys):
    assert main(["verify-fixture", str(MG)]) == 0
    assert main(["verify-fixture", str(MG), "--tol", "1e-9"]) == 1


def test_a_wrong_rule_is_caught(tmp_path):
    """The replay is sensitive: the same fixture with its mouse input zeroed no longer passes."""
    import shutil
    dst = tmp_path / "mg"
    shutil.copytree(MG, dst)
    inp = load_file(str(dst / "inputs.safetensors"))
    inp["mouse_cond"] = torch.zeros_like(inp["mouse_cond"])
    save_file(inp, str(dst / "inputs.safetensors"))
    r = verify_fixture(dst)
    assert not r["passed"] and r["latents_max_abs_err"] > 1e-2


# ---- every variant: the engine equals a whole-clip recomputation -----------------------------------------------
CASES = [("gta_drive", None, 8, 8), ("templerun", None, 8, 8), ("universal", None, 8, 12), ("universal", 4, 6, 10)]


@pytest.mark.parametrize("variant,window,H,W", CASES, ids=["gta-window4", "templerun", "non-square", "window4-6x10"])
def test_incremental_equals_whole_clip(tmp_path, variant, window, H, W):
    """A fixture of the same schema written by the naive whole-clip rollout (block-causal mask limited to the window,
    per-frame timesteps, action windows from the whole sequences) replays through the engine: other variants,
    non-square latents, a window that is not a multiple of the block."""
    cfg = tiny_config(variant, window)
    dit = tiny_model(cfg)
    steps = VARIANTS[variant][3]
    inputs = random_inputs(cfg, 12, H, W, steps=len(steps))
    folder = write_fixture(tmp_path / variant, dit, inputs, steps, cfg.local_attn_size)
    r = verify_fixture(folder)
    assert r["passed"], r
    assert len(r["x0_errors"]) == 4 * len(steps) and r["x0_max_abs_err"] < 1e-5


# ---- sessions ---------------------------------------------------------------------------------------------------
def _engine(dit, H=8, W=8, sessions=2):
    return Engine(build_bundle(dit, name="mg", height=H * 8, width=W * 8), max_sessions=sessions,
                  kv_pages=sessions * 6, keep_latents=True)


def _open(eng, inputs, actions, seed=0):
    return eng.open_session("", num_frames=len(actions), seed=seed, actions=actions,
                            model_inputs={"image_tokens": inputs["visual_context"],
                                          "image_latents": inputs["cond_concat"][0, :, 4:]})


def _acts(n, keys, mouse):
    return [{"keys": keys, "mouse": mouse}] * n


@pytest.fixture(scope="module")
def mg():
    cfg = tiny_config("universal")
    return tiny_model(cfg), random_inputs(cfg, 12, 8, 8), random_inputs(cfg, 12, 8, 8, seed=7)


def _run(eng, *sessions):
    for _ in range(1000):
        for s in sessions:
            s.poll()
        if all(s.done for s in sessions):
            break
        eng.step()
    assert all(s.status == "finished" for s in sessions), [s.status for s in sessions]
    return [torch.cat(s.latents) for s in sessions]


def test_batched_sessions_with_different_actions_equal_each_alone(mg):
    dit, a, b = mg
    eng = _engine(dit)
    s1, s2 = _open(eng, a, _acts(25, "wa", [0.0, 0.1]), seed=1), _open(eng, b, _acts(25, "s", [0.1, -0.1]), seed=2)
    together = _run(eng, s1, s2)
    assert eng.scheduler.max_batch >= 2
    alone1 = _run(e := _engine(dit), _open(e, a, _acts(25, "wa", [0.0, 0.1]), seed=1))[0]
    alone2 = _run(e := _engine(dit), _open(e, b, _acts(25, "s", [0.1, -0.1]), seed=2))[0]
    assert (together[0] - alone1).abs().max() < 1e-5
    assert (together[1] - alone2).abs().max() < 1e-5
    other = _run(e := _engine(dit), _open(e, a, _acts(25, "d", [0.0, 0.1]), seed=1))[0]
    assert (other - alone1).abs().max() > 1e-3  # the keys reach the model


def test_a_fork_mid_stream_continues_with_its_own_actions(mg):
    dit, a, _ = mg
    eng = _engine(dit, sessions=3)
    parent = eng.open_session("", num_frames=25, seed=3, model_inputs={
        "image_tokens": a["visual_context"], "image_latents": a["cond_concat"][0, :, 4:]})
    parent.act({"keys": "w"})
    for _ in range(100):  # two blocks, then the fork at the boundary
        if len(parent.latents) >= 2 and parent.at_block_boundary:
            break
        eng.step()
    assert parent.at_block_boundary
    child = parent.fork()
    parent.act({"keys": "a", "mouse": [0.0, 0.2]})
    child.act({"keys": "d", "mouse": [0.1, 0.0]})
    child.resume()
    p, c = _run(eng, parent, child)
    eng2 = _engine(dit)
    ref = eng2.open_session("", num_frames=25, seed=3, model_inputs={
        "image_tokens": a["visual_context"], "image_latents": a["cond_concat"][0, :, 4:]})
    ref.act({"keys": "w"})
    for _ in range(100):
        if len(ref.latents) >= 2 and ref.at_block_boundary:
            break
        eng2.step()
    ref.act({"keys": "d", "mouse": [0.1, 0.0]})
    (r,) = _run(eng2, ref)
    assert c.shape[0] == 3 and p.shape[0] == r.shape[0] == 9  # the child keeps the blocks made after the fork
    assert (c - r[6:]).abs().max() < 1e-5
    assert (p[:6] - r[:6]).abs().max() < 1e-5  # the shared past
    assert (c - p[6:]).abs().max() > 1e-3  # its own actions
    assert eng.pages_in_use == 0


def test_held_action_spans_the_window_into_the_next_block(mg):
    """A key held from block 1 on reaches block 0's frames of no window, and the first frame of block 1 reads the
    pixel frames of block 0 (the 12-frame window), so acting changes the stream from block 1 only."""
    dit, a, _ = mg
    base = _run(e := _engine(dit), _open(e, a, _acts(25, "", [0.0, 0.0])))[0]
    eng = _engine(dit)
    s = eng.open_session("", num_frames=25, model_inputs={"image_tokens": a["visual_context"],
                                                          "image_latents": a["cond_concat"][0, :, 4:]})
    for _ in range(100):
        if s.latents and s.at_block_boundary:
            break
        eng.step()
    s.act({"keys": "w"})
    (got,) = _run(eng, s)
    assert (got[:3] - base[:3]).abs().max() == 0 and (got[3:] - base[3:]).abs().max() > 1e-3


# ---- the release layout and the presets --------------------------------------------------------------------------
def _release_dir(tmp_path, variant="universal"):
    cfg = tiny_config(variant)
    dit = tiny_model(cfg, seed=4)
    d = tmp_path / f"release_{variant}"
    d.mkdir()
    kw = {"model_type": "i2v", "dim": 64, "ffn_dim": 128, "freq_dim": 32, "num_heads": 2, "num_layers": 2,
          "in_dim": 36, "out_dim": 16, "eps": 1e-6, "local_attn_size": cfg.local_attn_size, "sink_size": 0,
          "text_len": 512, "inject_sample_info": False, "action_config": cfg.action}
    (d / "config.json").write_text(json.dumps(kw))
    save_file({f"model.{k}": v.contiguous() for k, v in dit.state_dict().items()}, str(d / "model.safetensors"))
    return d, dit


def test_release_folder_loads_strictly(tmp_path):
    d, dit = _release_dir(tmp_path)
    b = load_release(d, height=64, width=64)
    assert b.extra["variant"] == "universal" and b.window == 6 and b.sampling.num_steps == 3
    sd = b.dit.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in dit.state_dict().items())
    # the release's four unused gains may be absent
    w = load_file(str(d / "model.safetensors"))
    for k in [k for k in w if "attn_q_norm" in k and "action_model" in k]:
        del w[k]
    save_file(w, str(d / "model.safetensors"))
    load_release(d, height=64, width=64)
    b2 = load_model(d)  # load_model recognises the folder
    assert b2.adapter_class.__name__ == "MatrixGameAdapter"


def test_checkpoint_of_another_variant_is_refused(tmp_path):
    d, _ = _release_dir(tmp_path, "gta_drive")
    cfg = json.loads((d / "config.json").read_text())
    cfg["action_config"] = tiny_config("universal").action  # a universal config over gta weights
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="keyboard_embed.0.weight"):
        load_release(d, height=64, width=64)


def test_release_shapes_of_the_presets():
    cfg = release_config("universal")
    assert (cfg.dim, cfg.num_layers, cfg.image_dim, cfg.action_config.blocks) == (1536, 30, 1280, list(range(15)))
    assert release_config("templerun").action_config.enable_mouse is False
    assert release_config("gta_drive").local_attn_size == 4


# ---- bad input ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_engine():
    return Engine(load_model("matrix-game-tiny"), max_sessions=1)


def test_bad_inputs_get_clear_errors(tiny_engine):
    eng = tiny_engine
    img = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="init_image is 32x48, the engine runs 64x64"):
        eng.open_session("", init_image=np.zeros((48, 32, 3), np.uint8), num_frames=5)
    with pytest.raises(ValueError, match="starts from an image"):
        eng.open_session("", num_frames=5)
    with pytest.raises(ValueError, match="unknown key 'z'"):
        eng.open_session("", init_image=img, num_frames=5, actions=[{"keys": "wz"}])
    with pytest.raises(ValueError, match="unknown key 'jump'"):
        eng.open_session("", init_image=img, num_frames=5, actions=[{"keys": ["jump"]}])
    with pytest.raises(ValueError, match="mouse must be"):
        eng.open_session("", init_image=img, num_frames=5, actions=[{"mouse": [1.0]}])
    with pytest.raises(ValueError, match="unknown action fields"):
        eng.open_session("", init_image=img, num_frames=5, actions=[{"button": 1}])
    with pytest.raises(ValueError, match="does not continue given frames"):
        eng.open_session("", init_image=img, init_frames=np.zeros((5, 64, 64, 3), np.uint8), num_frames=5)
    with pytest.raises(ValueError, match="mouse deltas must be within"):
        eng.open_session("", init_image=img, num_frames=5, actions=[{"mouse": [3.0, 0.0]}])
    assert eng.pages_in_use == 0 and not eng.sessions


def test_mouse_for_a_keyboard_only_variant_is_refused():
    dit = tiny_model(tiny_config("templerun"))
    eng = _engine(dit)
    with pytest.raises(ValueError, match="takes no mouse input"):
        eng.action_id({"keys": "w", "mouse": [0.0, 0.1]})
    assert eng.action_id({"keys": "wz"}) == (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0)  # jump + turnleft
    assert eng.action_id(None) == (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # no key held: "nomove"
    assert eng.adapter.controls()["mouse"] is False


def test_a_session_from_an_image_streams_frames(tiny_engine):
    eng = tiny_engine
    img = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)
    s = eng.open_session("", init_image=img, num_frames=9, actions=_acts(9, "w", [0.0, 0.05]))
    frames = np.concatenate(list(s))
    assert frames.shape == (9, 64, 64, 3) and frames.dtype == np.uint8
    assert eng.pages_in_use == 0


# ---- the command line --------------------------------------------------------------------------------------------
def test_generate_from_an_image_with_keyboard_and_mouse_writes_an_mp4(tmp_path, capsys):
    import av
    from PIL import Image
    img = tmp_path / "start.png"
    Image.fromarray((np.arange(80 * 100 * 3) % 253).astype(np.uint8).reshape(80, 100, 3)).save(img)
    out = tmp_path / "run.mp4"
    args = ["generate", "--model", "matrix-game-tiny", "--frames", "13", "--out", str(out), "--image", str(img)]
    assert main(args + ["--actions", "w,wa@0:0.1"]) == 2  # 100x80 is not the engine's 64x64
    assert "init_image is 100x80, the engine runs 64x64" in capsys.readouterr().err
    assert not out.exists()
    assert main(args + ["--fit-image", "--actions", "w,wa@0:0.1,_@0.1:0"]) == 0
    with av.open(str(out)) as f:
        assert sum(1 for _ in f.decode(video=0)) == 13
    acts = tmp_path / "acts.json"
    acts.write_text(json.dumps([{"keys": "d", "mouse": [0.0, -0.1]}] * 13))
    assert main(args + ["--fit-image", "--actions", str(acts)]) == 0
    assert main(args + ["--fit-image", "--actions", "wz"]) == 2
    assert "unknown key 'z'" in capsys.readouterr().err
    assert main(["generate", "--model", "matrix-game-tiny", "--frames", "5", "--out", str(out)]) == 2
    assert "--image" in capsys.readouterr().err


def test_prompt_switch_is_refused_and_a_snapshot_continues_bit_for_bit(tmp_path, mg):
    dit, a, _ = mg
    acts = _acts(25, "w", [0.0, 0.1])
    (full,) = _run(e := _engine(dit), _open(e, a, acts, seed=5))
    eng = _engine(dit)
    s = _open(eng, a, acts, seed=5)
    with pytest.raises(ValueError, match="takes no prompt"):
        s.set_prompt("a castle")
    for _ in range(100):
        if len(s.latents) >= 1 and s.at_block_boundary:
            break
        eng.step()
    s.snapshot(tmp_path / "mg.safetensors")
    s.cancel()
    eng2 = _engine(dit)
    r = eng2.restore(tmp_path / "mg.safetensors")
    r.resume()
    (rest,) = _run(eng2, r)
    assert torch.equal(rest, full[3:])
    assert eng.pages_in_use == 0 and eng2.pages_in_use == 0


def test_release_folder_with_its_image_encoder_and_vae_opens_from_an_image(tmp_path):
    """The release's layout: the DiT folder, with the CLIP image encoder (a transformers folder named image_encoder)
    and the VAE found beside it; a session opens from an image and streams frames."""
    import transformers
    from inferix.models.vae import WanVAE
    root = tmp_path / "Matrix-Game-2.0"
    root.mkdir()
    d, dit = _release_dir(root)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3, image_size=28,
        patch_size=14, hidden_act="gelu"))
    clip.save_pretrained(root / "image_encoder")
    WanVAE.tiny().model.save_pretrained(tmp_path / "vae")
    b = load_model(d, vae=tmp_path / "vae")
    assert b.image_encoder is not None and b.decoder is not None
    eng = Engine(b, height=64, width=64, max_sessions=1)
    img = np.full((64, 64, 3), 90, np.uint8)
    frames = np.concatenate(list(eng.open_session("", init_image=img, num_frames=5, actions=_acts(5, "w", None))))
    assert frames.shape == (5, 64, 64, 3)
    toks = b.image_encoder.encode_image(img)
    assert toks.shape == (1, 5, 32)  # 1 + (28 / 14)^2 penultimate-layer tokens


def test_bench_generate_opens_matrix_game_sessions_from_an_image(capsys):
    from inferix.bench import main as bench_main
    n = torch.get_num_threads()
    try:
        assert bench_main(["generate", "--preset", "matrix-game-tiny", "--frames", "13", "--device", "cpu",
                           "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(n)
    r = json.loads(capsys.readouterr().out)
    assert r["preset"] == "matrix-game-tiny" and r["frames"] == 13 and r["resolution"] == "64x64"
    assert r["pixel_fps_including_decode"] > 0 and 0 < r["time_to_first_frame_from_request_s"] < r["end_to_end_wall_s"]
    assert r["kv_pages_max_in_use"] <= 6 and r["kv_pages_in_use"] == 0


def test_engine_features_the_model_cannot_run_with_yet_are_refused_up_front():
    b = load_model("matrix-game-tiny")
    with pytest.raises(ValueError, match="CUDA graphs"):
        Engine(b, cuda_graphs=True)
    with pytest.raises(ValueError, match="parallelism"):
        Engine(b, parallel=object())


def test_start_image_latents_cover_the_session(tiny_engine):
    """A short session gets image latents for every frame, a long or unbounded one the image_frames default (a
    stream of thousands of frames does not wait for thousands of them); the first latent of the causal VAE sees the
    image alone."""
    eng = tiny_engine
    b = eng.bundle
    img = (np.arange(64 * 64 * 3) % 241).astype(np.uint8).reshape(64, 64, 3)
    _, inputs = eng.adapter.session_inputs(init_image=img, height=64, width=64, latent_frames=7)
    assert inputs["image_latents"].shape[0] == 7
    _, inputs_live = eng.adapter.session_inputs(init_image=img, height=64, width=64, latent_frames=None)
    assert inputs_live["image_latents"].shape[0] == 15
    _, inputs_long = eng.adapter.session_inputs(init_image=img, height=64, width=64, latent_frames=5000)
    assert inputs_long["image_latents"].shape[0] == 15
    alone = b.decoder.encode(img[None])[0, 0]
    assert torch.allclose(inputs["image_latents"][0], alone, atol=1e-5)
    assert torch.allclose(inputs_live["image_latents"][:7], inputs["image_latents"], atol=1e-5)


def test_sessions_with_different_context_lengths_batch_like_each_alone(mg):
    """Rows of one pass at different points of their streams (the action module's paged path with unequal contexts)
    give what each gives alone."""
    dit, a, b = mg
    eng = _engine(dit)
    first = _open(eng, a, _acts(25, "wa", [0.0, 0.1]), seed=1)
    for _ in range(100):  # the first session one block ahead
        if first.latents and first.at_block_boundary:
            break
        eng.step()
    second = _open(eng, b, _acts(25, "d", [0.05, 0.0]), seed=2)
    got = _run(eng, first, second)
    alone1 = _run(e := _engine(dit), _open(e, a, _acts(25, "wa", [0.0, 0.1]), seed=1))[0]
    alone2 = _run(e := _engine(dit), _open(e, b, _acts(25, "d", [0.05, 0.0]), seed=2))[0]
    assert (got[0] - alone1).abs().max() < 1e-5 and (got[1] - alone2).abs().max() < 1e-5


def test_image_tokens_of_an_ended_session_never_reach_a_new_one(mg):
    """Context K/V are cached by the identity of a session's tokens; the cache keeps them alive, so a new session's
    tokens never take an ended one's id (and its K/V)."""
    dit, a, _ = mg
    eng = _engine(dit)
    for i in range(6):
        tokens = torch.randn(1, 17, 32, generator=torch.Generator().manual_seed(i))
        inputs = {"image_tokens": tokens, "image_latents": a["cond_concat"][0, :, 4:]}
        s = eng.open_session("", num_frames=9, seed=0, model_inputs=inputs)
        (got,) = _run(eng, s)
        ref = _run(e := _engine(dit), e.open_session("", num_frames=9, seed=0, model_inputs={
            "image_tokens": tokens.clone(), "image_latents": inputs["image_latents"]}))[0]
        assert torch.equal(got, ref), i
        del s, tokens, inputs


def test_relative_positions_are_refused_and_the_memory_check_counts_the_action_caches():
    from inferix.sizing import estimate_engine_bytes
    b = load_model("matrix-game-tiny")
    with pytest.raises(ValueError, match="absolute frame positions only"):
        Engine(b, positions="relative")
    eng = Engine(b, max_sessions=1)
    kw = dict(num_layers=2, kv_rows=eng.kv.num_pages, page_tokens=16, num_heads=2, head_dim=32, dtype_bytes=4,
              height=64, width=64, block_pixel_frames=13)
    plain = estimate_engine_bytes(**kw)["kv_pool"]
    with_groups = estimate_engine_bytes(**kw, group_shapes=eng.adapter.cache_groups(16))["kv_pool"]
    assert with_groups == eng.pool.nbytes() > plain
