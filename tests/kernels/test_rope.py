"""Triton RoPE kernel and the complex-multiply torch version vs reference_apply_rope."""
import pytest
import torch

from inferix.kernels.rope import (apply_rope, apply_rope_qk, reference_apply_rope, rope_angles, rope_cos_sin,
                                  torch_apply_rope, triton_apply_rope)


def angles(B, F, h, w, D, device, dtype=None, start=0):
    frames = torch.arange(start, start + F)[None].expand(B, F) + 7 * torch.arange(B)[:, None]
    return rope_cos_sin(rope_angles(frames.to(device), h, w, D), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(device, dtype):
    # 2 rows at different frame offsets, 3 frames of 3x5 tokens (L=45: a partial token tile), D=32 (6/5/5)
    cos, sin = angles(2, 3, 3, 5, 32, device)
    x = torch.randn(2, 45, 3, 32, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    out = triton_apply_rope(x, cos, sin)
    ref = reference_apply_rope(x, cos, sin)
    assert out.dtype == dtype and out.shape == x.shape
    # the same arithmetic in cos/sin's dtype: equal up to one unit of the final rounding to x's dtype
    ulp = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    err = (out.float() - ref.float()).abs()
    assert (err <= ulp * ref.float().abs() + 1e-6).all(), f"max error {err.max().item():.3g}"


def test_head_dim_not_power_of_two_and_strided_input(device):
    cos, sin = angles(1, 2, 2, 2, 48, device, dtype=torch.float32)
    qkv = torch.randn(1, 8, 3, 4, 48, generator=torch.Generator().manual_seed(1)).to(device)
    q = qkv[:, :, 0]  # [1, 8, 4, 48] with a token stride of 3*4*48
    out = triton_apply_rope(q, cos, sin, block_t=4)
    assert (out - reference_apply_rope(q, cos, sin)).abs().max().item() < 1e-6


def test_qk_fused(device):
    cos, sin = angles(2, 2, 2, 4, 64, device)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 16, 4, 64, generator=g).to(device)
    k = torch.randn(2, 16, 2, 64, generator=g).to(device)
    if device == "cpu":  # apply_rope_qk dispatches to the reference on CPU; the kernel path itself:
        from inferix.kernels.rope import _launch_rope
        qo, ko = _launch_rope(q, k, cos, sin, None)
    else:
        qo, ko = apply_rope_qk(q, k, cos, sin)
    assert (qo - reference_apply_rope(q, cos, sin)).abs().max().item() < 1e-6
    assert (ko - reference_apply_rope(k, cos, sin)).abs().max().item() < 1e-6


def test_rotation_is_not_identity(device):
    cos, sin = angles(1, 2, 2, 2, 32, device, start=3)
    x = torch.randn(1, 8, 1, 32, generator=torch.Generator().manual_seed(3)).to(device)
    out = triton_apply_rope(x, cos, sin)
    assert (out - x).abs().max().item() > 1e-2
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation keeps norms


@pytest.mark.parametrize("angle_dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_version_is_the_reference_on_cpu(angle_dtype, dtype):
    """torch_apply_rope (what apply_rope and apply_rope_qk run off CUDA, and what the attention backends rotate cached
    keys with) gives the reference's values, for strided inputs too; half-precision angles go to the reference."""
    cos, sin = angles(2, 3, 2, 3, 48, "cpu", dtype=angle_dtype, start=5)
    qkv = torch.randn(2, 18, 3, 2, 48, generator=torch.Generator().manual_seed(5)).to(dtype)
    q, k = qkv[:, :, 0], qkv[:, :, 1]  # strided views, as the attention's projections may give
    ref = reference_apply_rope(q, cos, sin)
    for out in (torch_apply_rope(q, cos, sin), apply_rope(q, cos, sin), apply_rope_qk(q, k, cos, sin)[0]):
        assert out.dtype == dtype and out.shape == q.shape
        assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()
    assert torch.equal(apply_rope_qk(q, k, cos, sin)[1], reference_apply_rope(k, cos, sin))
    odd = torch.randn(q.numel() + 1).to(dtype)[1:].view(q.shape)  # contiguous, starting on an odd element
    assert torch.equal(torch_apply_rope(odd, cos, sin), reference_apply_rope(odd, cos, sin))
    assert (ref - q).abs().max() > 1e-2  # the angles do rotate
    with pytest.raises(ValueError, match=r"cos/sin must be \[B, L, D/2\]"):
        torch_apply_rope(q[:, :4], cos, sin)


def test_bad_shapes(device):
    cos, sin = angles(1, 1, 2, 2, 32, device)
    with pytest.raises(ValueError, match=r"cos/sin must be \[B, L, D/2\]"):
        triton_apply_rope(torch.zeros(1, 5, 2, 32, device=device), cos, sin)
    with pytest.raises(ValueError, match="even head_dim"):
        triton_apply_rope(torch.zeros(1, 4, 2, 31, device=device), cos[..., :15], sin[..., :15])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_wan_block(dtype):
    # one Wan block: 3 frames of 30x52 tokens, 12 heads x 128, fp32 angles
    cos, sin = angles(1, 3, 30, 52, 128, "cuda", dtype=torch.float32, start=18)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4680, 12, 128, generator=g).to("cuda", dtype)
    k = torch.randn(1, 4680, 12, 128, generator=g).to("cuda", dtype)
    qo, ko = apply_rope_qk(q, k, cos, sin)
    # one unit of the output dtype (bf16), or a few fp32 units of the operands (FMA contraction on GPU)
    ulp, floor = (2.0 ** -7, 1e-6) if dtype == torch.bfloat16 else (2.0 ** -22, 4e-6)
    for out, x in ((qo, q), (ko, k)):
        ref = reference_apply_rope(x, cos, sin).float()
        assert ((out.float() - ref).abs() <= ulp * ref.abs() + floor).all()
    assert torch.equal(apply_rope(q, cos, sin), triton_apply_rope(q, cos, sin))
