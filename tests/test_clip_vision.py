"""CLIP vision encoder (models/clip_vision.py): penultimate-layer tokens checked against transformers' CLIP on
tiny random models, in both weight layouts (transformers folders and Wan's XLMRobertaCLIP .pth), plus the
preprocessing of encode_image and the refusal of checkpoints that do not fit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

from inferix.models.clip_vision import PRESETS, CLIPVisionConfig, CLIPVisionEncoder

TINY = PRESETS["tiny"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def _hf_vision_config(act: str) -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(hidden_size=TINY.dim, intermediate_size=TINY.mlp_dim,
                                         num_hidden_layers=TINY.layers, num_attention_heads=TINY.heads,
                                         image_size=TINY.image_size, patch_size=TINY.patch_size, hidden_act=act,
                                         layer_norm_eps=1e-5)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial LayerNorms and biases too (transformers initializes them to 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == TINY.dim else 0))


def _pixels(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(seed))


def _penultimate(vision_model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


# ---------------------------------------------------------------------------------------------------
# transformers layout
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_transformers_vision_model_folder(tmp_path, act):
    ref = transformers.CLIPVisionModel(_hf_vision_config(act)).eval()
    _randomize(ref, seed=3)
    ref.save_pretrained(tmp_path)
    ours = CLIPVisionEncoder.load(tmp_path)
    assert ours.config.act == act and ours.config.layers == TINY.layers and len(ours.blocks) == TINY.layers - 1
    x = _pixels()
    want = _penultimate(ref, x)
    got = ours(x)
    assert got.shape == (2, TINY.num_tokens, TINY.dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the weights file itself (config.json beside it) loads the same
    torch.testing.assert_close(CLIPVisionEncoder.load(tmp_path / "model.safetensors")(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["clip_model", "with_projection", "pipeline_image_encoder", "prefixed_bin"])
def test_transformers_prefixed_layouts(tmp_path, kind):
    """vision_model.* keys: a CLIPModel (text tower ignored), a CLIPVisionModelWithProjection (projection ignored),
    a diffusers pipeline's image_encoder/ folder, and a pytorch_model.bin with keys as older transformers saved."""
    vcfg = _hf_vision_config("gelu")
    if kind == "clip_model":
        tcfg = transformers.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=50, max_position_embeddings=8)
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=tcfg.to_dict(),
                                                               vision_config=vcfg.to_dict(), projection_dim=8))
    else:
        model = transformers.CLIPVisionModelWithProjection(vcfg)
    model.eval()
    _randomize(model, seed=4)
    folder = tmp_path / "image_encoder" if kind == "pipeline_image_encoder" else tmp_path
    model.save_pretrained(folder)
    if kind == "prefixed_bin":  # the same keys as pytorch_model.bin, every vision key under vision_model.
        (folder / "model.safetensors").unlink()
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        assert any(k.startswith("vision_model.") for k in sd)
        sd["vision_model.embeddings.position_ids"] = torch.arange(TINY.num_tokens)[None]
        torch.save(sd, folder / "pytorch_model.bin")
    x = _pixels()
    want = _penultimate(model.vision_model, x)
    ours = CLIPVisionEncoder.load(tmp_path)
    torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)


def test_transformers_folder_refusals(tmp_path):
    ref = transformers.CLIPVisionModel(_hf_vision_config("quick_gelu"))
    ref.save_pretrained(tmp_path)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    key = next(k for k in sd if k.endswith("encoder.layers.2.mlp.fc2.bias"))  # the last block is required too
    del sd[key]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: .*layers\.2\.mlp\.fc2\.bias"):
        CLIPVisionEncoder.load(tmp_path)
    with pytest.raises(ValueError, match="differs from the config asked for"):
        CLIPVisionEncoder.load(tmp_path, config="vit-h-14")


# ---------------------------------------------------------------------------------------------------
# Wan XLMRobertaCLIP layout
# ---------------------------------------------------------------------------------------------------
def _wan_state_dict(cfg: CLIPVisionConfig, seed: int = 5) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of Wan's XLMRobertaCLIP (vision pool 'token', pre_norm),
    with a few text-tower entries that the loader must ignore."""
    g = torch.Generator().manual_seed(seed)
    d, m, p, t = cfg.dim, cfg.mlp_dim, cfg.patch_size, cfg.num_tokens

    def r(*shape, base=0.0):
        return torch.randn(*shape, generator=g) * 0.2 + base

    sd = {"visual.patch_embedding.weight": r(d, 3, p, p), "visual.cls_embedding": r(1, 1, d),
          "visual.pos_embedding": r(1, t, d), "visual.pre_norm.weight": r(d, base=1.0), "visual.pre_norm.bias": r(d),
          "visual.post_norm.weight": r(d, base=1.0), "visual.post_norm.bias": r(d), "visual.head": r(d, 24)}
    for i in range(cfg.layers):
        b = f"visual.transformer.{i}."
        sd.update({b + "norm1.weight": r(d, base=1.0), b + "norm1.bias": r(d), b + "attn.to_qkv.weight": r(3 * d, d),
                   b + "attn.to_qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
                   b + "norm2.weight": r(d, base=1.0), b + "norm2.bias": r(d), b + "mlp.0.weight": r(m, d),
                   b + "mlp.0.bias": r(m), b + "mlp.2.weight": r(d, m), b + "mlp.2.bias": r(d)})
    sd.update({"textual.token_embedding.weight": r(50, 16), "textual.head.0.weight": r(20, 16),
               "log_scale": torch.tensor(4.6)})
    return sd


def _wan_to_transformers(sd: dict[str, torch.Tensor], cfg: CLIPVisionConfig) -> dict[str, torch.Tensor]:
    """The same tensors under transformers' CLIPVisionModel names, mapped one by one."""
    d = cfg.dim
    out = {"embeddings.patch_embedding.weight": sd["visual.patch_embedding.weight"],
           "embeddings.class_embedding": sd["visual.cls_embedding"][0, 0],
           "embeddings.position_embedding.weight": sd["visual.pos_embedding"][0],
           "pre_layrnorm.weight": sd["visual.pre_norm.weight"], "pre_layrnorm.bias": sd["visual.pre_norm.bias"],
           "post_layernorm.weight": sd["visual.post_norm.weight"], "post_layernorm.bias": sd["visual.post_norm.bias"]}
    for i in range(cfg.layers):
        w, h = f"visual.transformer.{i}.", f"encoder.layers.{i}."
        qkv_w, qkv_b = sd[w + "attn.to_qkv.weight"], sd[w + "attn.to_qkv.bias"]
        out.update({
            h + "self_attn.q_proj.weight": qkv_w[:d], h + "self_attn.k_proj.weight": qkv_w[d:2 * d],
            h + "self_attn.v_proj.weight": qkv_w[2 * d:], h + "self_attn.q_proj.bias": qkv_b[:d],
            h + "self_attn.k_proj.bias": qkv_b[d:2 * d], h + "self_attn.v_proj.bias": qkv_b[2 * d:],
            h + "self_attn.out_proj.weight": sd[w + "attn.proj.weight"],
            h + "self_attn.out_proj.bias": sd[w + "attn.proj.bias"],
            h + "layer_norm1.weight": sd[w + "norm1.weight"], h + "layer_norm1.bias": sd[w + "norm1.bias"],
            h + "layer_norm2.weight": sd[w + "norm2.weight"], h + "layer_norm2.bias": sd[w + "norm2.bias"],
            h + "mlp.fc1.weight": sd[w + "mlp.0.weight"], h + "mlp.fc1.bias": sd[w + "mlp.0.bias"],
            h + "mlp.fc2.weight": sd[w + "mlp.2.weight"], h + "mlp.fc2.bias": sd[w + "mlp.2.bias"]})
    return out


def _transformers_reference(sd: dict[str, torch.Tensor]) -> transformers.CLIPVisionModel:
    ref = transformers.CLIPVisionModel(_hf_vision_config("gelu")).eval()  # Wan's ViT-H uses exact GELU, eps 1e-5
    mapped = _wan_to_transformers(sd, TINY)
    if any(k.startswith("vision_model.") for k in ref.state_dict()):  # transformers < 5 nests the tower
        mapped = {"vision_model." + k: v for k, v in mapped.items()}
    ref.load_state_dict(mapped, strict=True)
    return ref


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_wan_layout_matches_transformers(tmp_path, suffix):
    sd = _wan_state_dict(TINY)
    path = tmp_path / f"clip{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file(sd, path)
    ours = CLIPVisionEncoder.load(path, config="tiny")
    x = _pixels(3)
    got = ours(x)
    assert got.shape == (3, TINY.num_tokens, TINY.dim)
    torch.testing.assert_close(got, _penultimate(_transformers_reference(sd), x), atol=1e-5, rtol=1e-5)
    # a release folder holding the file under its original name
    torch.save(sd, tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    torch.testing.assert_close(CLIPVisionEncoder.load(tmp_path, config="tiny")(x), got, atol=0, rtol=0)


def test_wan_layout_refusals(tmp_path):
    sd = _wan_state_dict(TINY)

    def load(d: dict, name: str, **kw):
        torch.save(d, tmp_path / name)
        return CLIPVisionEncoder.load(tmp_path / name, **kw)

    missing = dict(sd)
    del missing["visual.transformer.1.attn.proj.bias"]
    with pytest.raises(ValueError, match=r"missing.pth: .*missing keys: visual\.transformer\.1\.attn\.proj\.bias"):
        load(missing, "missing.pth", config="tiny")
    extra = dict(sd, **{"visual.transformer.0.attn.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"extra.pth: .*unexpected keys: visual\.transformer\.0\.attn\.extra\.weight"):
        load(extra, "extra.pth", config="tiny")
    bad_shape = dict(sd, **{"visual.transformer.0.mlp.0.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"shape mismatches: visual\.transformer\.0\.mlp\.0\.bias \(7,\)"):
        load(bad_shape, "shape.pth", config="tiny")
    # the default architecture is ViT-H/14: a tiny tower is refused with what differs
    with pytest.raises(ValueError, match=r"does not match .*dim=32 \(config: 1280\)"):
        load(sd, "tiny.pth")
    # a file of another kind
    dit = {"blocks.0.self_attn.q.weight": torch.zeros(4, 4), "head.head.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match=r"dit.pth: not a CLIP vision checkpoint"):
        load(dit, "dit.pth")
    with pytest.raises(ValueError, match=r"unexpected keys outside visual"):
        load(dict(sd, **{"model.foo": torch.zeros(1)}), "outside.pth", config="tiny")


# ---------------------------------------------------------------------------------------------------
# preprocessing, random weights
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(28, 28), (50, 37)])
def test_encode_image_resizes_and_normalizes(hw):
    enc = CLIPVisionEncoder.random("tiny", seed=0)
    imgs = np.random.default_rng(0).integers(0, 256, size=(2, *hw, 3), dtype=np.uint8)
    got = enc.encode_image(imgs)
    assert got.dtype == torch.float32 and got.shape == (2, TINY.num_tokens, TINY.dim)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    if hw != (TINY.image_size,) * 2:
        x = F.interpolate(x, size=(TINY.image_size,) * 2, mode="bicubic", align_corners=False)
    with torch.no_grad():
        want = enc((x - MEAN) / STD)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # Wan's order: resize the [-1, 1] frame, then map to [0, 1]; the same up to rounding
    y = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    y = F.interpolate(y, size=(TINY.image_size,) * 2, mode="bicubic", align_corners=False) * 0.5 + 0.5
    torch.testing.assert_close(enc.preprocess(imgs), (y - MEAN) / STD, atol=1e-5, rtol=1e-5)
    # one [H, W, 3] image (a torch tensor) is a batch of one
    torch.testing.assert_close(enc.encode_image(torch.from_numpy(imgs[1])), got[1:], atol=1e-6, rtol=1e-6)


def test_encode_image_refuses_bad_input():
    enc = CLIPVisionEncoder.random("tiny")
    with pytest.raises(TypeError, match="uint8"):
        enc.encode_image(np.zeros((28, 28, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        enc.encode_image(np.zeros((28, 28, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, 28, 28\]"):
        enc(torch.zeros(1, 3, 32, 32))


def test_random_is_seeded_and_frozen():
    a, b, c = (CLIPVisionEncoder.random("tiny", seed) for seed in (0, 0, 1))
    x = _pixels(1)
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)
    assert not torch.allclose(a(x), c(x))
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert sum(p.numel() for p in a.parameters()) > 0 and len(a.blocks) == TINY.layers - 1
    assert PRESETS["vit-h-14"].num_tokens == 257 and PRESETS["vit-h-14"].dim == 1280
