"""End to end: the causal Wan DiT gives the same predictions and cache with TritonBackend as with
ReferenceBackend, for paged passes (commit and denoise, ragged rows, raw-key cache), block-causal clips
and dense clips."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from inferix.kernels.attention import BlockCausalMeta, KVPool, PagedMeta, ReferenceBackend, get_backend
from inferix.kernels.paged_attention import TritonBackend
from inferix.kernels.rope import rope_angles, rope_cos_sin
from inferix.models.wan_dit import PRESETS, CausalWanDiT

FIXTURE = Path(__file__).parents[1] / "fixtures" / "self_forcing_tiny"


def tiny_model(device, dtype=torch.float32):
    model = CausalWanDiT(PRESETS["tiny"])
    # the fixture's weights: spread enough that attention is far from uniform
    model.load_state_dict(load_file(str(FIXTURE / "weights.safetensors")), strict=True)
    return model.eval().to(device, dtype)


def inputs(B, F, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, 16, 8, 8, generator=g).to(device)  # 4x4 = 16 tokens per frame
    text = torch.randn(B, 16, 32, generator=g).to(device)
    return x, text


def meta(pool, tables, ctx, write=None, cos=None, sin=None):
    dev = pool.k[0].device
    as_i32 = lambda t: None if t is None else torch.tensor(t, dtype=torch.int32, device=dev)  # noqa: E731
    return PagedMeta(pool=pool, block_tables=as_i32(tables), context_pages=as_i32(ctx), write_pages=as_i32(write),
                     cache_cos=cos, cache_sin=sin)


def new_pool(device, dtype=torch.float32):
    return KVPool.allocate(num_layers=2, num_pages=12, page_tokens=16, kv_heads=2, head_dim=32, dtype=dtype,
                           device=device)


def assert_close(a, b, tol, what, mean_tol=None):
    diff = (a.float() - b.float()).abs()
    assert diff.max().item() < tol, f"{what}: max abs difference {diff.max().item():.3g} >= {tol}"
    if mean_tol is not None:
        assert diff.mean().item() < mean_tol, f"{what}: mean abs difference {diff.mean().item():.3g} >= {mean_tol}"


def test_get_backend_gives_triton():
    assert isinstance(get_backend("triton"), TritonBackend)


@torch.no_grad()
def test_paged_passes_match_reference(device):
    model = tiny_model(device)
    text = model.prepare_text(inputs(2, 3, device, 0)[1])
    pools = {"ref": new_pool(device), "tri": new_pool(device)}
    backends = {"ref": ReferenceBackend(), "tri": TritonBackend()}
    t = lambda v: torch.full((2, 3), float(v), device=device)  # noqa: E731

    # 1. commit pass of each row's first block (no context), pages given out of order
    x, _ = inputs(2, 3, device, 1)
    fp = torch.tensor([[0, 1, 2], [0, 1, 2]], device=device)
    out = {n: model(x, t(0), text, frame_pos=fp, backend=backends[n],
                    meta=meta(pools[n], [[0], [0]], [0, 0], write=[[5, 2, 9], [1, 7, 3]])) for n in pools}
    assert_close(out["tri"], out["ref"], 1e-4, "commit pass output")
    for layer in range(2):
        assert_close(pools["tri"].k[layer], pools["ref"].k[layer], 1e-6, "stored keys")
        assert_close(pools["tri"].v[layer], pools["ref"].v[layer], 1e-6, "stored values")

    # 2. denoising pass, ragged: row 0 reads its 3 pages, row 1 only its first (a sink-like prefix)
    x, _ = inputs(2, 3, device, 2)
    fp = torch.tensor([[3, 4, 5], [1, 2, 3]], device=device)
    tables = [[5, 2, 9], [1, 0, 0]]
    out = {n: model(x, t(500), text, frame_pos=fp, backend=backends[n], meta=meta(pools[n], tables, [3, 1]))
           for n in pools}
    assert_close(out["tri"], out["ref"], 1e-4, "denoising pass output")
    no_ctx = model(x, t(500), text, frame_pos=fp, backend=backends["ref"], meta=meta(pools["ref"], tables, [0, 0]))
    assert (no_ctx - out["ref"]).abs().max().item() > 1e-2, "context pages had no effect"

    # 3. commit pass with context: writes three more pages per row; a copy of the Triton pool gets the same
    #    commit as the engine runs it (kv_only: the last layer stops after its cache write)
    kv_only_pool = KVPool(k=[p.clone() for p in pools["tri"].k], v=[p.clone() for p in pools["tri"].v])
    out = {n: model(x, t(0), text, frame_pos=fp, backend=backends[n],
                    meta=meta(pools[n], tables, [3, 1], write=[[10, 0, 4], [6, 8, 11]])) for n in pools}
    assert_close(out["tri"], out["ref"], 1e-4, "second commit pass output")
    assert model(x, t(0), text, frame_pos=fp, backend=TritonBackend(), kv_only=True,
                 meta=meta(kv_only_pool, tables, [3, 1], write=[[10, 0, 4], [6, 8, 11]])) is None
    for layer in range(2):
        assert_close(pools["tri"].k[layer], pools["ref"].k[layer], 1e-5, "stored keys after second commit")
        assert_close(kv_only_pool.k[layer], pools["ref"].k[layer], 1e-5, "keys stored by a K/V-only commit")
        assert_close(kv_only_pool.v[layer], pools["ref"].v[layer], 1e-5, "values stored by a K/V-only commit")


@torch.no_grad()
def test_raw_key_cache_with_cache_relative_rope(device):
    """Pool holds unrotated keys; cos/sin of the cached frames are given per row (TritonBackend rotates
    them inside the kernel, the reference rotates gathered keys)."""
    model = tiny_model(device)
    x0, text = inputs(1, 3, device, 3)
    text = model.prepare_text(text)
    pools = {"ref": new_pool(device), "tri": new_pool(device)}
    backends = {"ref": ReferenceBackend(), "tri": TritonBackend()}
    cdt = torch.float64 if device == "cpu" else torch.float32
    cos, sin = rope_cos_sin(rope_angles(torch.tensor([[0, 1, 2]], device=device), 4, 4, 32), dtype=cdt)
    t = lambda v: torch.full((1, 3), float(v), device=device)  # noqa: E731
    for n in pools:  # commit frames 0-2 as raw keys
        model(x0, t(0), text, frame_pos=torch.tensor([[0, 1, 2]], device=device), backend=backends[n],
              meta=meta(pools[n], [[4, 8, 1]], [0], write=[[4, 8, 1]], cos=cos, sin=sin))
    x1, _ = inputs(1, 3, device, 4)
    out = {n: model(x1, t(750), text, frame_pos=torch.tensor([[3, 4, 5]], device=device), backend=backends[n],
                    meta=meta(pools[n], [[4, 8, 1]], [3], cos=cos, sin=sin)) for n in pools}
    assert_close(out["tri"], out["ref"], 1e-4, "raw-key cache pass")


@torch.no_grad()
def test_block_causal_and_dense_clips(device):
    model = tiny_model(device)
    x, text = inputs(1, 6, device, 5)
    text = model.prepare_text(text)
    t = torch.tensor([[0.0, 0, 0, 500, 500, 500]], device=device)
    bc = BlockCausalMeta(frame_tokens=16, block_frames=3)
    ref = model(x, t, text, meta=bc, backend=ReferenceBackend())
    tri = model(x, t, text, meta=bc, backend=TritonBackend())
    assert_close(tri, ref, 1e-4, "block-causal clip")
    ref = model(x, t, text, meta=None, backend=ReferenceBackend())
    tri = model(x, t, text, meta=None, backend=TritonBackend())
    assert_close(tri, ref, 1e-4, "dense clip")


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.zeros(1, 16, 2, 32)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        TritonBackend().masked(q, q, q, None)


def bf16_model_errors(device):
    """Commit + denoising pass of a bf16 model with each backend, against the same passes of the fp32 model
    with the reference backend. Returns {backend: (max abs error, mean abs error)} of the denoising pass."""
    truth_model = tiny_model(device)
    model = tiny_model(device, torch.bfloat16)
    x, text = inputs(2, 3, device, 6)
    t = torch.zeros(2, 3, device=device)
    fp = torch.tensor([[3, 4, 5], [3, 4, 5]], device=device)
    tables, ctx = [[0, 1, 2], [4, 5, 3]], [3, 2]

    def run(m, backend, dtype):
        pool = new_pool(device, dtype)
        kv = m.prepare_text(text)
        m(x, t, kv, backend=backend, meta=meta(pool, [[0], [0]], [0, 0], write=[[0, 1, 2], [3, 4, 5]]))
        return m(x, t + 500, kv, frame_pos=fp, backend=backend, meta=meta(pool, tables, ctx))

    truth = run(truth_model, ReferenceBackend(), torch.float32)
    errs = {}
    for name, backend in (("reference", ReferenceBackend()), ("triton", TritonBackend())):
        d = (run(model, backend, torch.bfloat16).float() - truth).abs()
        errs[name] = (d.max().item(), d.mean().item())
    return errs


def check_bf16_errors(errs):
    (ref_max, ref_mean), (tri_max, tri_mean) = errs["reference"], errs["triton"]
    # the kernel (bf16 tensor-core products, fp32 accumulation) is about as accurate as the fp32-softmax
    # reference run on the same bf16 model; a wrong page or a dropped tile costs far more than this
    assert tri_mean <= 1.5 * ref_mean + 1e-3, errs
    assert tri_max <= 2.0 * ref_max + 2e-2, errs


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_bf16_model():
    check_bf16_errors(bf16_model_errors("cuda"))
