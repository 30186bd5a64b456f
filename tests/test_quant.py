"""FP8 (e4m3) weights for the causal Wan DiT: the emulated path's rounding, the layers it touches, the model's
output, bad input, and (where torchao imports) torchao's own path against the emulation on the CPU."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from inferix.models import quant
from inferix.models.quant import (DIT_FP8_EXCLUDE, FP8_MAX, FP8Linear, fp8_error_bound, fp8_filter, fp8_quantize,
                                  fp8_targets, quantize_dit_fp8)
from inferix.models.wan_dit import PRESETS, CausalWanDiT, WanDiTConfig

WEIGHTS = Path(__file__).parent / "fixtures" / "self_forcing_tiny" / "weights.safetensors"
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
BLOCK_LINEARS = [f"blocks.{i}.{name}" for i in range(2) for name in
                 ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                  "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")]


def tiny_dit(dtype=torch.float32, actions=0):
    """The fixture's tiny DiT (trained-like weight spread); with actions, an action embedding (random)."""
    if actions:
        torch.manual_seed(0)
        model = CausalWanDiT(WanDiTConfig(num_actions=actions))
        model.load_state_dict(load_file(str(WEIGHTS)), strict=False)
    else:
        model = CausalWanDiT(PRESETS["tiny"])
        model.load_state_dict(load_file(str(WEIGHTS)), strict=True)
    return model.eval().to(dtype)


def run(model, seed=1, t=500.0, actions=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 8, 8, generator=g)
    text = torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.full((2, 3), t), text, actions=actions)


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, f"not a one-line error: {msg!r}"
    return msg


# ---- rounding --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_weights_within_e4m3_bound(granularity, dtype):
    """|w_fp8 - w| <= max(2^-4 |w|, 2^-10 s) with s = amax / 448 (half an e4m3 step: 3 mantissa bits in the
    normal range, fixed step 2^-9 below 2^-6, both in units of s); the bound is also nearly reached, so a
    coarser format (e5m2: 2^-3) or a wrong scale would fail."""
    model = tiny_dit(dtype)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in BLOCK_LINEARS}
    quantize_dit_fp8(model, granularity=granularity, backend="emulate")
    worst = 0.0
    for name, m in model.named_modules():
        if name not in BLOCK_LINEARS:
            continue
        w = originals[name].float()
        assert isinstance(m, FP8Linear) and m.weight_fp8.dtype == torch.float8_e4m3fn
        assert m.weight_scale.dtype == torch.float32
        assert m.weight_scale.shape == ((w.shape[0], 1) if granularity == "row" else (1, 1))
        amax = w.abs().amax(1, keepdim=True) if granularity == "row" else w.abs().amax().reshape(1, 1)
        # the scale maps each row's (tensor's) largest magnitude to 448, up to the rounding of amax / 448 in
        # the weight's dtype
        assert torch.allclose(m.weight_scale, amax / FP8_MAX, rtol=2.0 ** -8, atol=0)
        biggest = m.weight_fp8.float().abs().amax(1) if granularity == "row" else m.weight_fp8.float().abs().amax()
        assert (biggest == FP8_MAX).all()
        err = (m.dequantized_weight() - w).abs()
        bound = fp8_error_bound(w, m.weight_scale) * (1 + 2.0 ** -20)  # + fp32 rounding of w / s
        assert (err <= bound).all(), f"{name}: error {(err / bound).max().item():.3f} x the e4m3 bound"
        worst = max(worst, (err / bound).max().item())
    assert worst > 0.5, f"errors reach only {worst:.2f} of the bound: is the weight really rounded to e4m3?"


def test_zero_rows_stay_exact():
    w = torch.randn(4, 32)
    w[2] = 0
    data, scale = fp8_quantize(w)
    assert scale[2].item() == 1.0 and (data[2].float() == 0).all()
    lin = nn.Linear(32, 4)
    with torch.no_grad():
        lin.weight.copy_(w)
    x = torch.randn(3, 32)
    x[1] = 0  # a zero input row (token) too
    out = FP8Linear(lin)(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 2], lin.bias.detach()[2].expand(3)) and torch.equal(out[1], lin.bias.detach())


# ---- which layers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_linears_quantized_excluded_modules_untouched(dtype):
    model = tiny_dit(dtype, actions=3)
    kept = {n: (p, p.detach().clone()) for n, p in model.named_parameters()
            if n.split(".")[0] in DIT_FP8_EXCLUDE}
    assert {n.split(".")[0] for n in kept} == set(DIT_FP8_EXCLUDE)  # every excluded module exists here
    biases = {n: m.bias for n, m in model.named_modules() if n in BLOCK_LINEARS}
    assert fp8_targets(model) == BLOCK_LINEARS
    quantize_dit_fp8(model, backend="emulate")
    after = dict(model.named_parameters())
    for n, (p, snapshot) in kept.items():
        assert after[n] is p and p.dtype == dtype and torch.equal(p, snapshot), f"{n} changed"
    fp8 = [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]
    assert fp8 == BLOCK_LINEARS
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.startswith("blocks."))
    for n, m in model.named_modules():
        if n in BLOCK_LINEARS:
            assert m.bias is biases[n] and m.bias.dtype == dtype  # biases stay in the model's dtype
    assert model.patch_embedding.weight.dtype == dtype and model.head.head.weight.dtype == dtype


# ---- the model's output ----------------------------------------------------------------------------------

@pytest.mark.parametrize("activations", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_dit_output_close_but_not_identical(dtype, activations):
    """Relative error ||y_fp8 - y|| / ||y|| in (2^-8, 2^-3).

    Upper bound: one e4m3 rounding costs at most 2^-4 relative and, spread over binades, about 2^-4 / sqrt(3)
    ~ 3.6 % RMS; a matmul with FP8 weights and FP8 inputs has independent errors in both, ~5 % RMS relative.
    The DiT adds these errors layer by layer into a residual stream that also carries the unquantized path
    (embeddings, norms, head), so a correct quantization stays near that figure (measured: 2-4.5 % here);
    2^-3 = 12.5 % leaves 2.5x margin while a wrong scale or transposed weight gives O(1). Lower bound: the
    output must move by far more than fp32/bf16 arithmetic noise, or quantization did nothing."""
    model = tiny_dit(dtype, actions=3)
    acts = torch.tensor([[0, 1, 2], [2, 2, 0]])
    for t in (0.0, 500.0, 1000.0):
        ref = run(model, t=t, actions=acts).float()
        out = run(quantize_dit_fp8(copy.deepcopy(model), activations=activations, backend="emulate"), t=t,
                  actions=acts).float()
        assert torch.isfinite(out).all()
        rel = ((out - ref).norm() / ref.norm()).item()
        assert 2.0 ** -8 < rel < 2.0 ** -3, f"t={t}: relative error {rel:.4f}"


# ---- bad input -------------------------------------------------------------------------------------------

def test_bad_input_is_a_one_line_error():
    with pytest.raises(ValueError) as e:
        quantize_dit_fp8(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), backend="emulate")
    assert "has no nn.Linear layers to quantize" in one_line(e)
    with pytest.raises(ValueError) as e:
        quantize_dit_fp8(tiny_dit(), granularity="channel")
    assert one_line(e) == "granularity must be one of 'row', 'tensor', got 'channel'"
    with pytest.raises(ValueError) as e:
        quantize_dit_fp8(tiny_dit(), backend="cuda")
    assert "backend must be one of 'auto', 'torchao', 'emulate', got 'cuda'" == one_line(e)
    with pytest.raises(ValueError) as e:
        quantize_dit_fp8(nn.Linear(16, 16))
    assert "bare nn.Linear" in one_line(e)
    model = quantize_dit_fp8(tiny_dit(), backend="emulate")
    with pytest.raises(ValueError) as e:
        quantize_dit_fp8(model, backend="emulate")
    assert "already has FP8 layers" in one_line(e)
    with pytest.raises(ValueError) as e:
        fp8_quantize(torch.ones(2, 2), "block")
    one_line(e)


def test_torchao_backend_needs_an_fp8_gpu():
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine can run FP8 matmuls")
    with pytest.raises(RuntimeError) as e:
        quantize_dit_fp8(tiny_dit(torch.bfloat16), backend="torchao")
    assert "compute capability 8.9+" in one_line(e) and "backend='emulate'" in str(e.value)


def test_torchao_backend_checks_weights_before_quantizing(monkeypatch):
    monkeypatch.setattr(quant, "_check_fp8_device", lambda device: None)  # as if on an FP8 GPU
    with pytest.raises(ValueError) as e:
        quantize_dit_fp8(tiny_dit(torch.float32), backend="torchao")
    assert "needs bfloat16 weights, blocks.0.self_attn.q is torch.float32" in one_line(e)
    odd = CausalWanDiT(WanDiTConfig(ffn_dim=72)).to(torch.bfloat16)
    with pytest.raises(ValueError) as e:
        quantize_dit_fp8(odd, backend="torchao")
    assert "blocks.0.ffn.0 has weight [72, 64]; FP8 matmuls need both dims to be multiples of 16" in one_line(e)
    zero = tiny_dit(torch.bfloat16)
    with torch.no_grad():
        zero.blocks[1].ffn[2].weight[5] = 0
    with pytest.raises(ValueError) as e:
        quantize_dit_fp8(zero, backend="torchao")
    assert "blocks.1.ffn.2 has an all-zero weight row" in one_line(e)


def test_missing_torchao_is_a_one_line_error(monkeypatch):
    import sys

    monkeypatch.setattr(quant, "_check_fp8_device", lambda device: None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as if not installed
    with pytest.raises(RuntimeError) as e:
        quantize_dit_fp8(tiny_dit(torch.bfloat16), backend="torchao")
    assert "pip install 'inferix[fp8]'" in one_line(e)


# ---- torchao on the CPU --------------------------------------------------------------------------------------

needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install 'inferix[fp8]')")


@needs_torchao
def test_torchao_filter_picks_exactly_the_block_linears():
    """torchao's own traversal (quantize_ with weight-only FP8, which runs on the CPU) with our filter."""
    from torchao.quantization import Float8WeightOnlyConfig, PerRow, quantize_

    model = tiny_dit(torch.bfloat16, actions=3)
    seen = []
    keep = fp8_filter(fp8_targets(model))
    quantize_(model, Float8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False),
              filter_fn=lambda m, fqn: (seen.append(fqn) or True) and keep(m, fqn))
    quantized = [n for n, m in model.named_modules()
                 if isinstance(getattr(m, "weight", None), torch.Tensor) and type(m.weight) is not nn.Parameter]
    assert quantized == BLOCK_LINEARS
    # the filter saw the excluded Linear layers and said no (they were not merely out of reach)
    assert {"head.head", "text_embedding.0", "time_embedding.2", "time_projection.1"} <= set(seen)
    assert all(type(p) is nn.Parameter and p.dtype == torch.bfloat16 for n, p in model.named_parameters()
               if n.split(".")[0] in DIT_FP8_EXCLUDE)
    assert fp8_targets(model) == []  # quantized layers are not targets again


@needs_torchao
@pytest.mark.parametrize("activations", [True, False])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_torchao_path_matches_emulation_on_cpu(monkeypatch, granularity, activations):
    """The real torchao backend (dynamic FP8 activations through torch._scaled_mm, which has a CPU kernel, or
    weight-only) with the hardware checks patched out: the same e4m3 data and scales as the emulation, and
    outputs equal up to the accumulation order of the matmuls."""
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quant, "_check_fp8_device", lambda device: None)
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularities: None)
    base = tiny_dit(torch.bfloat16)
    ao = quantize_dit_fp8(copy.deepcopy(base), granularity=granularity, activations=activations, backend="torchao")
    emu = quantize_dit_fp8(copy.deepcopy(base), granularity=granularity, activations=activations,
                           backend="emulate")
    ao_modules = dict(ao.named_modules())
    for name, m in emu.named_modules():
        if isinstance(m, FP8Linear):
            w = ao_modules[name].weight
            assert torch.equal(w.qdata.view(torch.uint8), m.weight_fp8.view(torch.uint8)), name
            assert torch.equal(w.scale.reshape(m.weight_scale.shape), m.weight_scale), name
    out_ao, out_emu, ref = run(ao).float(), run(emu).float(), run(base).float()
    rel = ((out_ao - out_emu).norm() / out_emu.norm()).item()
    assert rel < 2.0 ** -6, f"torchao vs emulation: relative difference {rel:.4f}"
    assert ((out_ao - ref).norm() / ref.norm()).item() > 2.0 ** -8  # and it did quantize


@pytest.mark.skipif(not (HAS_TORCHAO and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="needs torchao and a CUDA GPU of compute capability 8.9+")
def test_gpu_torchao_fp8_matches_emulation():
    base = tiny_dit(torch.bfloat16).cuda()
    ao = quantize_dit_fp8(copy.deepcopy(base))  # auto: torchao on CUDA
    emu = quantize_dit_fp8(copy.deepcopy(base), backend="emulate")
    assert not any(isinstance(m, FP8Linear) for m in ao.modules())
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 3, 16, 8, 8, generator=g).cuda(), torch.randn(2, 16, 32, generator=g).cuda()
    with torch.no_grad():
        a, b = (m(x, torch.full((2, 3), 500.0, device="cuda"), text).float() for m in (ao, emu))
    assert ((a - b).norm() / b.norm()).item() < 2.0 ** -6
