"""DiT checkpoint formats: every layout loads to the same model, the fixture's step is reproduced, LoRA merges,
and bad files fail with errors that name the file and every offending key.

The writers of the formats live here, not in the package: each writes what the corresponding project
(diffusers, Wan, Self-Forcing / CausVid / LongLive) puts on disk, as documented in the fixture README.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from inferix.models.checkpoints import (CheckpointError, build_dit, infer_dit_config, load_dit, load_pipeline_dir,
                                        save_dit)
from inferix.models.wan_dit import PRESETS, CausalWanDiT, WanDiTConfig


# ---------------------------------------------------------------------------------------------------
# writers of the formats (test helpers)
# ---------------------------------------------------------------------------------------------------
def _fixture_kwargs(fx) -> dict:
    return json.loads((fx / "config.json").read_text())["model_kwargs"]


def _wan_config_json(kwargs: dict) -> dict:
    """config.json as the original Wan repositories write it (WanModel leaves out patch_size, text_dim, ...)."""
    keep = ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "model_type", "num_heads", "num_layers", "out_dim",
            "text_len")
    return {"_class_name": "WanModel", "_diffusers_version": "0.30.0", **{k: kwargs[k] for k in keep},
            "text_dim": kwargs["text_dim"]}  # the fixture's text_dim is not Wan's default 4096, so it is written


def write_wan_dir(path, sd, cfg_json, shards=1):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg_json))
    if shards == 1:
        save_file(sd, str(path / "diffusion_pytorch_model.safetensors"))
        return path
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(part, str(path / name))
        weight_map.update({k: name for k in part})
    (path / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def training_container(sd, **entries):
    """Self-Forcing / CausVid / LongLive trainer layout: the DiT sits under the wrapper's `.model`."""
    return {name: {"model." + k: v for k, v in (w if w is not None else sd).items()} for name, w in entries.items()}


@pytest.fixture(scope="module")
def fx(self_forcing_tiny):
    return self_forcing_tiny


@pytest.fixture(scope="module")
def ours_sd(fx):
    return load_file(fx / "weights.safetensors")


@pytest.fixture(scope="module")
def tiny_cfg(fx):
    return WanDiTConfig.from_dict({k: v for k, v in _fixture_kwargs(fx).items()
                                   if k not in ("model_type", "local_attn_size", "sink_size")})


@pytest.fixture(scope="module")
def probe(fx):
    """A pass with mixed per-frame timesteps over 4 frames (fixture noise and prompt)."""
    inputs = load_file(fx / "inputs.safetensors")
    x, ctx = inputs["initial_noise"][:, :4], inputs["prompt_embeds"]
    t = torch.tensor([[0.0, 0.0, 937.5, 937.5]])

    def run(model):
        with torch.no_grad():
            return model(x, t, ctx)
    return run


@pytest.fixture(scope="module")
def formats(tmp_path_factory, fx, ours_sd, tiny_cfg):
    """name -> zero-argument loader, one per on-disk layout (all hold the fixture's weights)."""
    root = tmp_path_factory.mktemp("formats")
    from diffusers import WanTransformer3DModel
    diff = WanTransformer3DModel.from_pretrained(fx / "diffusers_transformer")
    diff.save_pretrained(root / "diffusers_sharded", max_shard_size="200KB")
    diff_sd = {k: v.contiguous() for k, v in diff.state_dict().items()}
    save_file(diff_sd, str(root / "flat_diffusers.safetensors"))
    save_file(ours_sd, str(root / "flat_ours.safetensors"))
    cfg_json = _wan_config_json(_fixture_kwargs(fx))
    write_wan_dir(root / "wan_dir", ours_sd, cfg_json)
    write_wan_dir(root / "wan_sharded", ours_sd, cfg_json, shards=3)
    scaled = {k: v * 1.5 for k, v in ours_sd.items()}  # a different "training" generator next to the EMA one
    torch.save({**training_container(ours_sd, generator_ema=None, generator=scaled),
                "critic": {"model.blocks.0.ffn.0.weight": torch.zeros(2)}, "step": 1200},
               root / "sf_both.pt")
    torch.save(training_container(ours_sd, generator=None), root / "gen_only.pt")
    torch.save(dict(ours_sd), root / "flat.pt")
    torch.save(training_container(ours_sd, generator=None), root / "legacy.pth", _use_new_zipfile_serialization=False)
    fsdp = {f"model._fsdp_wrapped_module.{k}".replace("blocks.0.", "blocks.0._checkpoint_wrapped_module."): v
            for k, v in ours_sd.items()}
    torch.save({"generator_ema": fsdp}, root / "fsdp_ema.pt")
    save_dit(build_dit(dict(ours_sd), tiny_cfg), root / "saved_dir")
    save_dit(build_dit(dict(ours_sd), tiny_cfg), root / "saved_file" / "dit.safetensors")
    heads = {"num_heads": 2, "text_len": 16}  # all that tensor shapes cannot tell for a tiny model
    return {
        "fixture_weights_pt": lambda: load_dit(fx / "weights.pt"),  # config.json next to it (model_kwargs)
        "fixture_weights_safetensors": lambda: load_dit(fx / "weights.safetensors"),
        "diffusers_dir": lambda: load_dit(fx / "diffusers_transformer", config={"text_len": 16}),
        "diffusers_sharded_dir": lambda: load_dit(root / "diffusers_sharded", config={"text_len": 16}),
        "wan_dir": lambda: load_dit(root / "wan_dir"),
        "wan_sharded_dir": lambda: load_dit(root / "wan_sharded"),
        "sf_generator_ema": lambda: load_dit(root / "sf_both.pt", config=tiny_cfg),
        "generator_only_pt": lambda: load_dit(root / "gen_only.pt", config=heads),
        "flat_pt": lambda: load_dit(root / "flat.pt", config=tiny_cfg),
        "legacy_pickle_pth": lambda: load_dit(root / "legacy.pth", config=heads),  # pre-zip torch.save format
        "fsdp_wrapped_ema": lambda: load_dit(root / "fsdp_ema.pt", config=heads),
        "flat_safetensors_ours": lambda: load_dit(root / "flat_ours.safetensors", config=heads),
        "flat_safetensors_diffusers": lambda: load_dit(root / "flat_diffusers.safetensors", config=heads),
        "save_dit_dir": lambda: load_dit(root / "saved_dir"),
        "save_dit_file": lambda: load_dit(root / "saved_file" / "dit.safetensors"),
        "_root": root,
    }


FORMAT_NAMES = ["fixture_weights_pt", "fixture_weights_safetensors", "diffusers_dir", "diffusers_sharded_dir",
                "wan_dir", "wan_sharded_dir", "sf_generator_ema", "generator_only_pt", "flat_pt", "legacy_pickle_pth",
                "fsdp_wrapped_ema",
                "flat_safetensors_ours", "flat_safetensors_diffusers", "save_dit_dir", "save_dit_file"]


# ---------------------------------------------------------------------------------------------------
# every format, one model
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_every_format_loads_to_identical_outputs(formats, name, ours_sd, tiny_cfg, probe):
    model = formats[name]()
    assert model.config == tiny_cfg
    ref = CausalWanDiT(tiny_cfg)
    ref.load_state_dict(ours_sd)  # plain PyTorch loading of the plain state dict, nothing of ours involved
    got, want = probe(model), probe(ref)
    assert torch.equal(got, want), (got - want).abs().max()
    sd = model.state_dict()
    assert all(torch.equal(sd[k], ours_sd[k]) for k in ours_sd)


def test_sharded_layouts_really_are_sharded(formats):
    root = formats["_root"]
    for d in ("diffusers_sharded", "wan_sharded"):
        index = json.loads((root / d / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 3, d


def test_fixture_reproduces_first_step(fx):
    # x0 = x_t - sigma * v with sigma = 1 at t = 1000 (fixture README, block 0 step 0)
    model = load_dit(fx / "weights.pt")
    inputs, expected = load_file(fx / "inputs.safetensors"), load_file(fx / "expected.safetensors")
    x = inputs["initial_noise"][:, :3]
    with torch.no_grad():
        v = model(x, torch.full((1, 3), 1000.0), inputs["prompt_embeds"])
    err = (x - 1.0 * v - expected["x0_b0_s0"]).abs().max().item()
    assert err <= 1e-4, err


def test_use_ema_choice(formats, ours_sd, tiny_cfg):
    root = formats["_root"]
    ema = load_dit(root / "sf_both.pt", config=tiny_cfg)
    gen = load_dit(root / "sf_both.pt", config=tiny_cfg, use_ema=False)
    k = "blocks.1.self_attn.q.weight"
    assert torch.equal(ema.state_dict()[k], ours_sd[k])
    assert torch.equal(gen.state_dict()[k], ours_sd[k] * 1.5)
    with pytest.raises(CheckpointError, match="generator_ema"):
        load_dit(formats["_root"] / "fsdp_ema.pt", config=tiny_cfg, use_ema=False)


def test_dtype_and_device(fx):
    model = load_dit(fx / "weights.pt", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not model.training


# ---------------------------------------------------------------------------------------------------
# config inference
# ---------------------------------------------------------------------------------------------------
def _meta_state_dict(cfg):
    with torch.device("meta"):
        return CausalWanDiT(cfg).state_dict()


@pytest.mark.parametrize("preset", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_infer_config_of_wan_sizes(preset):
    assert infer_dit_config(_meta_state_dict(PRESETS[preset])) == PRESETS[preset]


def test_infer_config_head_dim_rule_and_overrides():
    cfg = WanDiTConfig(dim=2048, ffn_dim=4096, num_heads=16, num_layers=3, freq_dim=256, text_dim=4096, text_len=512)
    assert infer_dit_config(_meta_state_dict(cfg)) == cfg  # not a preset: head_dim 128
    assert infer_dit_config(_meta_state_dict(cfg), overrides={"num_heads": 8}).num_heads == 8


def test_tiny_shapes_need_a_config(formats, ours_sd):
    with pytest.raises(CheckpointError, match="num_heads.*config"):
        load_dit(formats["_root"] / "flat_ours.safetensors")
    with pytest.raises(CheckpointError, match="flat.pt"):
        load_dit(formats["_root"] / "flat.pt")


def test_large_model_is_built_without_allocating():
    # meta tensors in, meta model out: the loader never materialises random weights of its own
    cfg = PRESETS["wan2.1-t2v-14b"]
    model = build_dit(_meta_state_dict(cfg), cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 14e9


def test_unrelated_config_json_beside_a_file_is_not_used(tmp_path, ours_sd, tiny_cfg):
    # e.g. a VAE's config.json in the same folder: ignored, so an explicit config still loads the file
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "z_dim": 16}))
    torch.save(dict(ours_sd), tmp_path / "dit.pt")
    assert load_dit(tmp_path / "dit.pt", config=tiny_cfg).config == tiny_cfg
    with pytest.raises(CheckpointError, match="num_heads"):
        load_dit(tmp_path / "dit.pt")


def test_wan_config_defaults(tmp_path, ours_sd):
    # a real Wan config.json has no text_dim / patch_size / qk_norm: WanModel's defaults apply (text_dim 4096)
    cfg = {"_class_name": "WanModel", "dim": 64, "ffn_dim": 128, "freq_dim": 32, "in_dim": 16, "model_type": "t2v",
           "num_heads": 2, "num_layers": 2, "out_dim": 16, "text_len": 16, "eps": 1e-6}
    write_wan_dir(tmp_path / "w", ours_sd, cfg)
    wrong_text_dim = r"text_embedding\.0\.weight: checkpoint \(64, 32\) vs model \(64, 4096\)"
    with pytest.raises(CheckpointError, match=wrong_text_dim):
        load_dit(tmp_path / "w")
    assert load_dit(tmp_path / "w", config={"text_dim": 32}).config.text_dim == 32


# ---------------------------------------------------------------------------------------------------
# LoRA (LongLive: base generator .pt + lora.pt holding PEFT's state dict under 'generator_lora')
# ---------------------------------------------------------------------------------------------------
def _lora_pair(out_f, in_f, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)


def test_lora_merge(tmp_path, fx, ours_sd):
    targets = {"blocks.0.self_attn.q": 3, "blocks.1.cross_attn.o": 4, "blocks.1.ffn.2": 5}
    lora, pairs = {}, {}
    for i, (name, rank) in enumerate(targets.items()):
        w = ours_sd[name + ".weight"]
        a, b = _lora_pair(w.shape[0], w.shape[1], rank, seed=i)
        pairs[name] = (a, b)
        # PEFT's get_peft_model_state_dict naming on the wrapper's `.model` (LongLive's lora.pt)
        lora[f"base_model.model.{name}.lora_A.weight"] = a
        lora[f"base_model.model.{name}.lora_B.weight"] = b
    torch.save({"generator_lora": lora, "critic_lora": {}, "step": 3}, tmp_path / "lora.pt")
    torch.save(training_container(ours_sd, generator=None), tmp_path / "longlive_base.pt")
    cfg = {"num_heads": 2, "text_len": 16}
    merged = load_dit(tmp_path / "longlive_base.pt", config=cfg, lora=tmp_path / "lora.pt").state_dict()
    for name, (a, b) in pairs.items():
        want = ours_sd[name + ".weight"] + b @ a  # alpha == rank (LongLive's configs) -> scale 1
        assert torch.allclose(merged[name + ".weight"], want, atol=1e-5), name
    untouched = [k for k in ours_sd if k.rsplit(".", 1)[0] not in targets]
    assert all(torch.equal(merged[k], ours_sd[k]) for k in untouched)
    # alpha / rank scaling and an extra multiplier
    m2 = load_dit(tmp_path / "longlive_base.pt", config=cfg, lora=tmp_path / "lora.pt", lora_alpha=6.0,
                  lora_scale=0.5).state_dict()
    a, b = pairs["blocks.0.self_attn.q"]
    want = ours_sd["blocks.0.self_attn.q.weight"] + 0.5 * (6.0 / 3) * (b @ a)
    assert torch.allclose(m2["blocks.0.self_attn.q.weight"], want, atol=1e-5)


def test_lora_key_variants_and_errors(tmp_path, ours_sd):
    w = ours_sd["blocks.0.ffn.0.weight"]
    a, b = _lora_pair(w.shape[0], w.shape[1], 2, seed=9)
    cfg = {"num_heads": 2, "text_len": 16}
    torch.save(training_container(ours_sd, generator=None), tmp_path / "base.pt")
    # adapter-named PEFT keys and diffusers module names give the same merge
    v1 = {"base_model.model.blocks.0.ffn.0.lora_A.default.weight": a,
          "base_model.model.blocks.0.ffn.0.lora_B.default.weight": b}
    v2 = {"blocks.0.ffn.net.0.proj.lora_A.weight": a, "blocks.0.ffn.net.0.proj.lora_B.weight": b}
    m1 = load_dit(tmp_path / "base.pt", config=cfg, lora=v1).state_dict()["blocks.0.ffn.0.weight"]
    m2 = load_dit(tmp_path / "base.pt", config=cfg, lora=v2).state_dict()["blocks.0.ffn.0.weight"]
    assert torch.equal(m1, m2) and torch.allclose(m1, w + b @ a, atol=1e-5)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.0: A \(2, 64\) and B \(3, 2\)"):
        load_dit(tmp_path / "base.pt", config=cfg, lora={"blocks.0.ffn.0.lora_A.weight": a,
                                                         "blocks.0.ffn.0.lora_B.weight": torch.zeros(3, 2)})
    with pytest.raises(CheckpointError, match=r"blocks\.7\.ffn\.0: no base weight"):
        load_dit(tmp_path / "base.pt", config=cfg, lora={"blocks.7.ffn.0.lora_A.weight": a,
                                                         "blocks.7.ffn.0.lora_B.weight": b})
    with pytest.raises(CheckpointError, match=r"only \['A'\]"):
        load_dit(tmp_path / "base.pt", config=cfg, lora={"blocks.0.ffn.0.lora_A.weight": a})


# ---------------------------------------------------------------------------------------------------
# bad checkpoints
# ---------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.pt"):
        load_dit(tmp_path / "no_such.pt")


def test_wrong_keys_and_shapes_in_one_error(tmp_path, ours_sd, tiny_cfg):
    sd = dict(ours_sd)
    del sd["blocks.1.norm3.bias"], sd["head.modulation"]
    sd["blocks.0.self_attn.gate.weight"] = torch.zeros(3)
    sd["blocks.0.ffn.0.weight"] = torch.zeros(100, 64)
    torch.save({"generator_ema": {"model." + k: v for k, v in sd.items()}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        load_dit(tmp_path / "bad.pt", config=tiny_cfg)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "bad.pt" in msg
    for piece in ("missing keys (2)", "blocks.1.norm3.bias", "head.modulation", "unexpected keys (1)",
                  "blocks.0.self_attn.gate.weight", "blocks.0.ffn.0.weight: checkpoint (100, 64) vs model (128, 64)"):
        assert piece in msg, piece


def test_diffusers_names_wrong_keys_listed(tmp_path, fx):
    sd = load_file(fx / "diffusers_transformer" / "diffusion_pytorch_model.safetensors")
    sd["condition_embedder.image_embedder.norm1.weight"] = torch.ones(4)  # an image-conditioned extra
    del sd["blocks.0.attn2.to_out.0.bias"]
    save_file(sd, str(tmp_path / "diff.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_dit(tmp_path / "diff.safetensors", config={"num_heads": 2, "text_len": 16})
    msg = str(e.value)
    # missing keys are named as our model names them; unknown diffusers keys keep their own names
    assert "blocks.0.cross_attn.o.bias" in msg and "condition_embedder.image_embedder.norm1.weight" in msg


class Opaque:
    pass


def test_non_tensor_pickles_refused(tmp_path, ours_sd):
    torch.save({"generator_ema": {"model.w": Opaque()}}, tmp_path / "custom.pt")
    with pytest.raises(CheckpointError, match=r"custom\.pt: refused: the pickle holds a test_checkpoints\.Opaque"):
        load_dit(tmp_path / "custom.pt")
    torch.save({"generator": {"model.patch_embedding.weight": {1, 2, 3}}}, tmp_path / "set.pt")
    with pytest.raises(CheckpointError, match=r"set\.pt\['generator'\].*patch_embedding\.weight \(set\)"):
        load_dit(tmp_path / "set.pt")
    torch.save([ours_sd["head.modulation"]], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt.*list"):
        load_dit(tmp_path / "list.pt")
    torch.save({"optimizer": {"lr": 0.1}, "step": 5}, tmp_path / "nodit.pt")
    with pytest.raises(CheckpointError, match=r"nodit\.pt.*generator_ema"):
        load_dit(tmp_path / "nodit.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_dit(tmp_path / "garbage.pt")


def test_bad_directories(tmp_path, fx, ours_sd):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_dit(tmp_path / "empty")
    d = write_wan_dir(tmp_path / "lost_shard", ours_sd, _wan_config_json(_fixture_kwargs(fx)), shards=2)
    (d / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="00002-of-00002"):
        load_dit(d)
    i2v = tmp_path / "i2v"
    shutil.copytree(fx / "diffusers_transformer", i2v)
    cfg = json.loads((i2v / "config.json").read_text())
    cfg["image_dim"] = 1280
    (i2v / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="image_dim"):
        load_dit(i2v)


# ---------------------------------------------------------------------------------------------------
# diffusers pipeline directory
# ---------------------------------------------------------------------------------------------------
def test_load_pipeline_dir(tmp_path, fx, tiny_umt5_dir, probe, ours_sd, tiny_cfg):
    from inferix.models.vae import WanVAE
    root = tmp_path / "pipe"
    shutil.copytree(fx / "diffusers_transformer", root / "transformer")
    shutil.copytree(tiny_umt5_dir / "text_encoder", root / "text_encoder")  # d_model 32 = the DiT's text_dim
    shutil.copytree(tiny_umt5_dir / "tokenizer", root / "tokenizer")
    vae = WanVAE.tiny(seed=0)
    vae.model.save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "transformer": [
        "diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}))
    dit, vae2, text = load_pipeline_dir(root, text_len=16)
    assert dit.config == tiny_cfg and text.text_len == 16 and text.text_dim == 32
    ref = CausalWanDiT(tiny_cfg)
    ref.load_state_dict(ours_sd)
    assert torch.equal(probe(dit), probe(ref))
    # prompt -> DiT -> streamed VAE: the three parts fit together
    ctx = text.encode("a red car in the rain")
    with torch.no_grad():
        lat = dit(torch.randn(1, 2, 16, 4, 4), torch.tensor([500.0]), ctx)
    frames = vae2.decode_block(vae2.new_stream(), lat)
    assert frames.shape == (5, 32, 32, 3)
    (root / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_pipeline_dir(root)
