"""Paged block attention kernel vs its naive reference (and block_attention vs its reference)."""
import pytest
import torch

from inferix.kernels.paged_attention import (block_attention, paged_block_attention, reference_block_attention,
                                             reference_paged_block_attention)
from inferix.kernels.rope import rope_angles, rope_cos_sin

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def make_case(*, B, L, H, Hkv, D, T, ctx, num_pages, dtype, device, seed=0, sink=0, pool_dtype=None):
    """Random q/k/v and pool; each row's table is sink pages (shared, low ids) then a shuffled window of
    distinct pages. Table entries past a row's context name a page full of NaN: reading one poisons the row."""
    g = torch.Generator().manual_seed(seed)
    pool_dtype = pool_dtype or dtype
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = rnd(B, L, H, D), rnd(B, L, Hkv, D), rnd(B, L, Hkv, D)
    k_pool, v_pool = rnd(num_pages, T, Hkv, D), rnd(num_pages, T, Hkv, D)
    poison = num_pages - 1
    k_pool[poison] = float("nan")
    v_pool[poison] = float("nan")
    width = max(ctx) + 2
    tables = torch.full((B, width), poison, dtype=torch.int32)
    free = torch.randperm(num_pages - 1 - sink, generator=g) + sink  # window pages, in random order
    used = 0
    for b, n in enumerate(ctx):
        s = min(sink, n)
        tables[b, :s] = torch.arange(s, dtype=torch.int32)
        w = n - s
        tables[b, s:n] = free[used:used + w].to(torch.int32)
        used += w
    assert used <= free.numel(), "pool too small for the requested contexts"
    to = lambda t, dt=dtype: t.to(device=device, dtype=dt)  # noqa: E731
    return dict(q=to(q), k=to(k), v=to(v), k_pool=to(k_pool, pool_dtype), v_pool=to(v_pool, pool_dtype),
                block_tables=tables.to(device), context_pages=torch.tensor(ctx, dtype=torch.int32, device=device))


def check(case, dtype, **launch):
    out = paged_block_attention(**case, **launch)
    ref = reference_paged_block_attention(**case)
    assert out.shape == ref.shape and out.dtype == case["q"].dtype
    assert torch.isfinite(out).all(), "a row read a page past its context (NaN page) or overflowed"
    err = (out.float() - ref.float()).abs().max().item()
    assert err < TOL[dtype], f"max abs error {err:.3g} > {TOL[dtype]}"
    return out, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ragged_gqa_partial_tiles(device, dtype):
    # page_tokens 24 with 32-token tiles: tiles straddle pages and the last one is partial; L=40 makes a
    # partial query tile; rows have 3, 0 and 5 context pages; 4 query heads share 2 KV heads.
    case = make_case(B=3, L=40, H=4, Hkv=2, D=32, T=24, ctx=[3, 0, 5], num_pages=11, dtype=dtype, device=device)
    check(case, dtype, block_m=32, block_n=32)


def test_sink_and_window_pages(device):
    # two sink pages (ids 0, 1) followed by window pages scattered over the pool; tile 16 = page 16
    case = make_case(B=2, L=32, H=2, Hkv=2, D=64, T=16, ctx=[6, 4], num_pages=12, dtype=torch.float16,
                     device=device, sink=2, seed=1)
    t = case["block_tables"].cpu()
    assert t[0, :2].tolist() == [0, 1] and t[1, :2].tolist() == [0, 1]
    window = t[0, 2:6]
    assert window.unique().numel() == 4 and not (window.diff() == 1).all()  # scattered, not a run
    check(case, torch.float16, block_m=32, block_n=16)


@pytest.mark.parametrize("D", [16, 48])
def test_page_larger_than_tile_not_multiple(device, D):
    # page_tokens 40 with 16-token tiles: 2.5 tiles per page, tile boundaries inside pages; D=48 is padded
    # to a 64-wide tile
    case = make_case(B=1, L=20, H=2, Hkv=1, D=D, T=40, ctx=[2], num_pages=4, dtype=torch.float32,
                     device=device, seed=2)
    check(case, torch.float32, block_m=16, block_n=16)


def test_zero_context_equals_dense(device):
    case = make_case(B=2, L=48, H=2, Hkv=1, D=32, T=16, ctx=[0, 0], num_pages=3, dtype=torch.float32,
                     device=device, seed=3)
    out, _ = check(case, torch.float32)
    dense = block_attention(case["q"], case["k"], case["v"])
    assert (out - dense).abs().max().item() < 1e-5


def test_table_order_matters(device):
    # Same pages, another order: with cache-relative RoPE the logical order changes the result, and even
    # without it a wrong page id would; here we check the kernel follows the table, not the physical order.
    case = make_case(B=1, L=16, H=2, Hkv=2, D=32, T=16, ctx=[3], num_pages=6, dtype=torch.float32,
                     device=device, seed=4)
    out1, _ = check(case, torch.float32)
    case2 = dict(case, block_tables=case["block_tables"].clone())
    case2["block_tables"][0, :3] = case2["block_tables"][0, [2, 0, 1]]
    out2, _ = check(case2, torch.float32)  # reference agrees on the permuted table too
    case3 = dict(case, block_tables=case["block_tables"].clone())
    unused = sorted(set(range(5)) - set(case["block_tables"][0, :3].tolist()))  # page 5 is the NaN page
    case3["block_tables"][0, 0] = unused[0]
    out3, _ = check(case3, torch.float32)
    assert (out1 - out3).abs().max().item() > 1e-3, "changing a page id did not change the output"
    # permuting pages without RoPE permutes keys only: softmax attention is order-invariant
    assert (out1 - out2).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cache_relative_rope_rotated_in_kernel(device, dtype):
    # Pool holds unrotated keys; cos/sin give each logical context token its angle (here: frame positions
    # 0..4 of 4x4 frames, D=32 pairs split 6/5/5). GQA + ragged rows.
    B, T, D = 2, 16, 32
    case = make_case(B=B, L=32, H=4, Hkv=2, D=D, T=T, ctx=[4, 1], num_pages=8, dtype=dtype, device=device, seed=5)
    width = case["block_tables"].shape[1]
    frames = torch.arange(width)[None].expand(B, width)
    cos, sin = rope_cos_sin(rope_angles(frames, 4, 4, D))  # [B, width*16, D/2]
    cdt = torch.float64 if device == "cpu" else torch.float32
    case.update(cache_cos=cos.to(device, cdt), cache_sin=sin.to(device, cdt))
    out, _ = check(case, dtype)
    unrotated = paged_block_attention(**dict(case, cache_cos=None, cache_sin=None))
    assert (out.float() - unrotated.float()).abs().max().item() > 1e-2, "rotation had no effect"


def test_pool_dtype_differs_from_q(device):
    case = make_case(B=2, L=16, H=2, Hkv=2, D=32, T=16, ctx=[2, 3], num_pages=7, dtype=torch.float32,
                     device=device, pool_dtype=torch.float16, seed=6)
    check(case, torch.float16)  # pool rounding dominates: fp16 tolerance


def test_large_pool_offsets_use_int64(device):
    """page_id * page_stride > 2**31: a pool view whose page stride is 2**30 + 1024 elements over a
    4 GiB (fp16) allocation that is never touched except for the 3 pages used; page 2 starts past 2**31.
    The stride itself fits int32, so only int64 page arithmetic in the kernel gets the address right."""
    T, Hkv, D = 16, 1, 32
    stride = 2 ** 30 + 1024
    pools = []
    for _ in range(2):
        base = torch.empty(2 * stride + T * Hkv * D, dtype=torch.float16, device=device)  # lazily mapped
        pools.append(base.as_strided((3, T, Hkv, D), (stride, Hkv * D, D, 1)))
    g = torch.Generator().manual_seed(7)
    for p in pools:
        for i in range(3):
            p[i] = torch.randn(T, Hkv, D, generator=g).to(device, torch.float16)
    assert 2 * pools[0].stride(0) > 2 ** 31
    q = torch.randn(1, 16, 2, D, generator=g).to(device, torch.float16)
    k = torch.randn(1, 16, Hkv, D, generator=g).to(device, torch.float16)
    v = torch.randn(1, 16, Hkv, D, generator=g).to(device, torch.float16)
    case = dict(q=q, k=k, v=v, k_pool=pools[0], v_pool=pools[1],
                block_tables=torch.tensor([[2, 0, 1]], dtype=torch.int32, device=device),
                context_pages=torch.tensor([3], dtype=torch.int32, device=device))
    check(case, torch.float16)


def test_bad_inputs_name_the_problem(device):
    case = make_case(B=2, L=16, H=2, Hkv=2, D=32, T=16, ctx=[1, 2], num_pages=5, dtype=torch.float32,
                     device=device)
    with pytest.raises(ValueError, match="context_pages"):
        paged_block_attention(**dict(case, context_pages=torch.tensor([1, 9], dtype=torch.int32, device=device)),
                              validate=True)
    bad = case["block_tables"].clone()
    bad[1, 0] = 99
    with pytest.raises(ValueError, match="outside the pool"):
        paged_block_attention(**dict(case, block_tables=bad), validate=True)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        paged_block_attention(**dict(case, q=torch.zeros(2, 16, 3, 32, device=device)))
    with pytest.raises(ValueError, match="pool pages hold"):
        paged_block_attention(**dict(case, k_pool=case["k_pool"][..., :16], v_pool=case["v_pool"][..., :16]))


@pytest.mark.parametrize("block_tokens", [None, 24])
def test_block_attention(device, block_tokens):
    # block-causal blocks of 24 tokens vs 32-token tiles: block ends fall inside tiles
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 72, 4, 32, generator=g).to(device)
    k = torch.randn(2, 72, 2, 32, generator=g).to(device)
    v = torch.randn(2, 72, 2, 32, generator=g).to(device)
    out = block_attention(q, k, v, block_tokens, block_m=32, block_n=32)
    ref = reference_block_attention(q, k, v, block_tokens)
    assert (out - ref).abs().max().item() < 2e-5
    if block_tokens:  # the first block must not see later ones
        dense = reference_block_attention(q, k, v)
        assert (out[:, :24] - dense[:, :24]).abs().max().item() > 1e-3


def test_dense_cross_lengths(device):
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 20, 2, 64, generator=g).to(device, torch.float16)
    k = torch.randn(1, 50, 1, 64, generator=g).to(device, torch.float16)
    v = torch.randn(1, 50, 1, 64, generator=g).to(device, torch.float16)
    out = block_attention(q, k, v, block_m=16, block_n=32)
    ref = reference_block_attention(q, k, v)
    assert (out.float() - ref.float()).abs().max().item() < 3e-3


# ---- GPU-native (compiled kernels, realistic shapes) -------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_wan_shape(dtype):
    # Wan-1.3B geometry: 12 heads x 128, one page = 1,560 tokens (not a power of two), a one-frame block
    case = make_case(B=2, L=1560, H=12, Hkv=12, D=128, T=1560, ctx=[4, 1], num_pages=8, dtype=dtype,
                     device="cuda", sink=1, seed=10)
    check(case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_small_pages_gqa_rope(dtype):
    B, T, D = 3, 16, 64
    case = make_case(B=B, L=48, H=8, Hkv=2, D=D, T=T, ctx=[7, 0, 3], num_pages=14, dtype=dtype, device="cuda",
                     sink=2, seed=11)
    check(case, dtype)
    width = case["block_tables"].shape[1]
    cos, sin = rope_cos_sin(rope_angles(torch.arange(width)[None].expand(B, width), 4, 4, D).cuda(),
                            dtype=torch.float32)
    check(dict(case, cache_cos=cos, cache_sin=sin), dtype)


@pytest.mark.gpu
def test_gpu_block_causal_bf16():
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 3 * 520, 4, 128, generator=g).cuda().bfloat16() for _ in range(3))
    out = block_attention(q, k, v, block_tokens=520)
    ref = reference_block_attention(q, k, v, block_tokens=520)
    assert (out.float() - ref.float()).abs().max().item() < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_large_pool_offsets():
    test_large_pool_offsets_use_int64("cuda")


def test_flop_formula():
    from inferix.kernels.paged_attention import attention_flops
    assert attention_flops(1, 12, 4680, 32760, 128) == 4 * 12 * 4680 * 32760 * 128
    assert attention_flops(2, 1, 3, 5, 7) == 4 * 2 * 3 * 5 * 7


@pytest.mark.parametrize("rope", [None, torch.float64, torch.float32])
def test_sdpa_backend_assembles_equal_contexts_like_the_reference(rope):
    # The SDPA backend's paged pass for rows that all read n pages builds [context | block] keys in one buffer
    # (context keys rotated into it); compare with the naive gather-rotate-attend reference, sink pages shared.
    from inferix.kernels.attention import KVPool, PagedMeta, SDPABackend
    B, T, D = 3, 16, 32
    case = make_case(B=B, L=32, H=2, Hkv=2, D=D, T=T, ctx=[5, 5, 5], num_pages=20, dtype=torch.float32,
                     device="cpu", seed=9, sink=2)
    width = case["block_tables"].shape[1]
    if rope is not None:
        cos, sin = rope_cos_sin(rope_angles(torch.arange(width)[None].expand(B, width), 4, 4, D), dtype=rope)
        case.update(cache_cos=cos, cache_sin=sin)
    ref = reference_paged_block_attention(**case)
    meta = PagedMeta(pool=KVPool(k=[case["k_pool"]], v=[case["v_pool"]]), block_tables=case["block_tables"],
                     context_pages=case["context_pages"], cache_cos=case.get("cache_cos"),
                     cache_sin=case.get("cache_sin"))
    out = SDPABackend().paged(case["q"], case["k"], case["v"], 0, meta)
    assert torch.isfinite(out).all(), "a row read a page past its context (NaN page)"
    assert (out - ref).abs().max().item() < TOL[torch.float32]
    if rope is not None:  # the rotation mattered
        unrotated = reference_paged_block_attention(**dict(case, cache_cos=None, cache_sin=None))
        assert (out - unrotated).abs().max().item() > 1e-2
