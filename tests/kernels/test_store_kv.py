"""store_kv kernel vs reference_store_kv (plain indexed assignment)."""
import pytest
import torch

from inferix.kernels import attention
from inferix.kernels.store_kv import reference_store_kv, store_kv


def make(B, F, T, H, D, num_pages, dtype, device, pool_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, F * T, H, D, generator=g).to(device, dtype)
    v = torch.randn(B, F * T, H, D, generator=g).to(device, dtype)
    pool = torch.randn(num_pages, T, H, D, generator=g).to(device, pool_dtype or dtype)
    pages = torch.randperm(num_pages, generator=g)[:B * F].reshape(B, F).to(torch.int32).to(device)
    return k, v, pool, pool.clone() * 2, pages


def run_both(k, v, kp, vp, pages):
    kp2, vp2 = kp.clone(), vp.clone()
    store_kv(kp, vp, k, v, pages)
    reference_store_kv(kp2, vp2, k, v, pages)
    return kp, vp, kp2, vp2


def test_reexported_from_attention():
    assert attention.reference_store_kv is reference_store_kv


@pytest.mark.parametrize("dtype,pool_dtype", [(torch.float32, None), (torch.float16, None),
                                              (torch.float32, torch.float16), (torch.bfloat16, None)])
def test_matches_reference(device, dtype, pool_dtype):
    # page_tokens 24 with the default 64-token tiles: partial tiles and tiles that straddle pages
    k, v, kp, vp, pages = make(B=2, F=3, T=24, H=2, D=32, num_pages=9, dtype=dtype, device=device,
                               pool_dtype=pool_dtype)
    untouched = [i for i in range(9) if i not in pages.flatten().tolist()]
    before_k = kp[untouched].clone()
    kp, vp, kp2, vp2 = run_both(k, v, kp, vp, pages)
    assert torch.equal(kp, kp2) and torch.equal(vp, vp2)
    assert torch.equal(kp[untouched], before_k), "pages outside write_pages changed"


def test_small_tiles_and_odd_head_dim(device):
    k, v, kp, vp, pages = make(B=3, F=2, T=5, H=3, D=24, num_pages=8, dtype=torch.float32, device=device, seed=1)
    kp2, vp2 = kp.clone(), vp.clone()
    store_kv(kp, vp, k, v, pages, block_t=4)
    reference_store_kv(kp2, vp2, k, v, pages)
    assert torch.equal(kp, kp2) and torch.equal(vp, vp2)


def test_strided_inputs(device):
    # k/v as views of a fused qkv projection ([B, L, 3, H, D] sliced): non-contiguous token strides
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(1, 32, 3, 2, 16, generator=g).to(device)
    k, v = qkv[:, :, 1], qkv[:, :, 2]
    kp = torch.zeros(4, 16, 2, 16, device=device)
    vp = torch.zeros(4, 16, 2, 16, device=device)
    pages = torch.tensor([[3, 1]], dtype=torch.int32, device=device)
    kp, vp, kp2, vp2 = run_both(k, v, kp, vp, pages)
    assert torch.equal(kp, kp2) and torch.equal(vp, vp2)


def test_large_pool_offsets(device):
    """Page 2 of a pool whose page stride is 2**30 + 1024 fp16 elements starts past 2**31 elements
    (4 GiB allocation, only the pages written are ever touched)."""
    T, H, D = 16, 1, 32
    stride = 2 ** 30 + 1024
    pools = [torch.empty(2 * stride + T * H * D, dtype=torch.float16, device=device).as_strided(
        (3, T, H, D), (stride, H * D, D, 1)) for _ in range(2)]
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, T, H, D, generator=g).to(device, torch.float16)
    v = torch.randn(1, T, H, D, generator=g).to(device, torch.float16)
    store_kv(pools[0], pools[1], k, v, torch.tensor([[2]], dtype=torch.int32, device=device))
    assert torch.equal(pools[0][2], k[0]) and torch.equal(pools[1][2], v[0])


def test_bad_inputs(device):
    k, v, kp, vp, pages = make(B=1, F=2, T=8, H=1, D=16, num_pages=4, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="block has 16 tokens but write_pages names 3 pages"):
        store_kv(kp, vp, k, v, torch.tensor([[0, 1, 2]], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="outside the pool"):
        store_kv(kp, vp, k, v, torch.tensor([[0, 7]], dtype=torch.int32, device=device), validate=True)
    with pytest.raises(ValueError, match="names a page twice"):
        store_kv(kp, vp, k, v, torch.tensor([[1, 1]], dtype=torch.int32, device=device), validate=True)
    with pytest.raises(ValueError, match="pool pages hold"):
        store_kv(kp, vp, k[..., :8], v[..., :8], pages)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,pool_dtype", [(torch.bfloat16, None), (torch.float32, torch.bfloat16)])
def test_gpu_wan_pages(dtype, pool_dtype):
    # a committed Wan block: 3 frames x 1,560 tokens, 12 heads x 128, two sessions
    k, v, kp, vp, pages = make(B=2, F=3, T=1560, H=12, D=128, num_pages=10, dtype=dtype, device="cuda",
                               pool_dtype=pool_dtype, seed=4)
    kp, vp, kp2, vp2 = run_both(k, v, kp, vp, pages)
    assert torch.equal(kp, kp2) and torch.equal(vp, vp2)


@pytest.mark.gpu
def test_gpu_large_pool_offsets():
    test_large_pool_offsets("cuda")
