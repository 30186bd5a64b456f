"""Attention benchmark for the Self-Forcing cache shape: TFLOP/s of the paged Triton kernel, torch SDPA
(flash backend) and FlexAttention, printed as JSON.

Shape (Wan2.1-1.3B at 480x832): one block of 3 latent frames = 4,680 query tokens, 12 heads x 128, bf16,
batch 1. Each row attends to Lk = context + 4,680 keys, where the context is whole pages of 1,560 tokens
(one latent frame each) read through a shuffled block table; Lk runs from 4,680 (no context) to 32,760
(21 frames, Self-Forcing's full cache) in steps of one block. SDPA and Flex get the same keys already
gathered into contiguous tensors (the gather is timed separately for SDPA), so their figures are an upper
bound for what a gather-then-attend backend gets.

FLOPs = 4 * B * H * Lq * Lk * D (QK^T and PV, 2 flops per multiply-add). Times are medians over several
runs, taken with torch.cuda.Event around each call (launch included).

    python -m inferix.bench_attention [--lk 4680 32760] [--iters 20] [--no-flex] [--sweep]
    inferix bench attention ...

Without CUDA it times a tiny shape with the naive reference and SDPA only, and says so.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from inferix.kernels.paged_attention import (attention_flops, paged_block_attention,
                                             reference_paged_block_attention)

FLOP_FORMULA = "4 * B * H * Lq * Lk * D  (QK^T and PV, 2 flops per multiply-add)"
SWEEP = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4)]


def cuda_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_inputs(B, Lq, H, D, T, ctx_pages, dtype, device, seed=0):
    """q/k/v of the block, a pool with the context pages in shuffled physical order, the block table, and
    the same context gathered into contiguous [B, Lk, H, D] keys/values (context then own block)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    q, k, v = rnd(B, Lq, H, D), rnd(B, Lq, H, D), rnd(B, Lq, H, D)
    num_pages = max(1, B * ctx_pages)
    k_pool, v_pool = rnd(num_pages, T, H, D), rnd(num_pages, T, H, D)
    perm = torch.randperm(num_pages, generator=g, device=device)
    tables = perm[:B * ctx_pages].reshape(B, ctx_pages).to(torch.int32) if ctx_pages else \
        torch.zeros(B, 1, dtype=torch.int32, device=device)
    ctx = torch.full((B,), ctx_pages, dtype=torch.int32, device=device)
    return q, k, v, k_pool, v_pool, tables, ctx


def gather(k, v, k_pool, v_pool, tables, ctx_pages):
    pages = tables[:, :ctx_pages].long()
    kc = k_pool[pages].flatten(1, 2)  # [B, ctx_pages*T, H, D]
    vc = v_pool[pages].flatten(1, 2)
    return torch.cat([kc, k], 1), torch.cat([vc, v], 1)  # [B, Lk, H, D]


def rate(ms: float, flops: int) -> dict:
    return {"ms": float(f"{ms:.4g}"), "tflops": float(f"{flops / (ms * 1e-3) / 1e12:.4g}")}


def run_cuda(a) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, Lq, H, D, T = a.batch, a.lq, a.heads, a.head_dim, a.page_tokens
    dtype = getattr(torch, a.dtype)
    flex = None
    if not a.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # report, don't die: the other columns still mean something
            flex = f"unavailable: {type(e).__name__}: {e}"
    rows = []
    for lk in a.lk:
        if (lk - Lq) % T or lk < Lq:
            raise ValueError(f"Lk {lk} must be {Lq} + a whole number of {T}-token pages")
        n = (lk - Lq) // T
        q, k, v, k_pool, v_pool, tables, ctx = make_inputs(B, Lq, H, D, T, n, dtype, "cuda")
        flops = attention_flops(B, H, Lq, lk, D)
        row = {"lk": lk, "context_pages": n, "tflop_per_call": round(flops / 1e12, 4)}

        def tri():
            return paged_block_attention(q, k, v, k_pool, v_pool, tables, ctx)
        row["triton_paged"] = rate(cuda_ms(tri, a.warmup, a.iters), flops)
        if n:
            ang = torch.rand(B, n * T, D // 2, device="cuda") * 6.28
            cos, sin = torch.cos(ang), torch.sin(ang)

            def tri_rope():
                return paged_block_attention(q, k, v, k_pool, v_pool, tables, ctx, cos, sin)
            row["triton_paged_raw_key_rope"] = rate(cuda_ms(tri_rope, a.warmup, a.iters), flops)

        kk, vv = gather(k, v, k_pool, v_pool, tables, n)
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, kk, vv))  # [B, H, L, D]

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt)

        def sdpa_gather():
            k2, v2 = gather(k, v, k_pool, v_pool, tables, n)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, k2.transpose(1, 2), v2.transpose(1, 2))
        try:
            row["sdpa_flash"] = rate(cuda_ms(sdpa, a.warmup, a.iters), flops)
            row["sdpa_flash_incl_gather"] = rate(cuda_ms(sdpa_gather, a.warmup, a.iters), flops)
            ref = sdpa().transpose(1, 2)
            row["max_abs_diff_triton_vs_sdpa"] = float((tri().float() - ref.float()).abs().max())
        except RuntimeError as e:
            row["sdpa_flash"] = f"failed: {e}"
        if callable(flex):
            try:
                bm = create_block_mask(lambda b, h, qi, ki: ki >= 0, None, None, Lq, lk, device="cuda")
                row["flex"] = rate(cuda_ms(lambda: flex(qt, kt, vt, block_mask=bm), a.warmup, a.iters), flops)
            except Exception as e:
                row["flex"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        elif flex is not None:
            row["flex"] = flex
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # progress while the whole report builds
        del q, k, v, k_pool, v_pool, kk, vv, qt, kt, vt
        torch.cuda.empty_cache()

    out = {"device": torch.cuda.get_device_name(), "dtype": a.dtype,
           "shape": {"B": B, "Lq": Lq, "H": H, "D": D, "page_tokens": T},
           "flop_formula": FLOP_FORMULA,
           "timing": f"median of {a.iters} runs after {a.warmup} warm-up runs, torch.cuda.Event per call",
           "columns": {
               "triton_paged": "paged Triton kernel: pages via shuffled block table + own block K/V",
               "triton_paged_raw_key_rope": "same, pool holds unrotated keys rotated in-kernel (cache_cos/sin)",
               "sdpa_flash": "torch SDPA, flash backend, on pre-gathered contiguous K/V (gather not timed)",
               "sdpa_flash_incl_gather": "torch SDPA flash including the page gather and concat",
               "flex": "torch.compile(flex_attention) with an all-visible block mask, pre-gathered K/V"},
           "rows": rows}
    if a.sweep:
        lk = max(a.lk)
        n = (lk - Lq) // T
        q, k, v, k_pool, v_pool, tables, ctx = make_inputs(B, Lq, H, D, T, n, dtype, "cuda")
        flops = attention_flops(B, H, Lq, lk, D)
        sweep = []
        for bm_, bn_, w, s in SWEEP:
            try:
                ms = cuda_ms(lambda: paged_block_attention(q, k, v, k_pool, v_pool, tables, ctx, block_m=bm_,
                                                           block_n=bn_, num_warps=w, num_stages=s),
                             a.warmup, a.iters)
                sweep.append({"block_m": bm_, "block_n": bn_, "num_warps": w, "num_stages": s, **rate(ms, flops)})
            except Exception as e:  # e.g. out of shared memory for this tile
                sweep.append({"block_m": bm_, "block_n": bn_, "num_warps": w, "num_stages": s,
                              "error": f"{type(e).__name__}: {str(e)[:160]}"})
        out["triton_tile_sweep"] = {"lk": lk, "configs": sweep}
    return out


def run_cpu(a) -> dict:
    torch.set_num_threads(1)  # small shared CPU machines: one thread gives steadier figures
    B, Lq, H, D, T = 1, 48, 2, 32, 16
    rows = []
    for n in (0, 3, 6):
        q, k, v, k_pool, v_pool, tables, ctx = make_inputs(B, Lq, H, D, T, n, torch.float32, "cpu")
        lk = Lq + n * T
        flops = attention_flops(B, H, Lq, lk, D)
        kk, vv = gather(k, v, k_pool, v_pool, tables, n)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, kk, vv))
        ref = lambda: reference_paged_block_attention(q, k, v, k_pool, v_pool, tables, ctx)  # noqa: E731
        sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
        rows.append({"lk": lk, "context_pages": n, "reference": rate(cpu_ms(ref, 2, a.iters), flops),
                     "sdpa": rate(cpu_ms(sdpa, 2, a.iters), flops),
                     "max_abs_diff_reference_vs_sdpa": float((ref() - sdpa().transpose(1, 2)).abs().max())})
    return {"device": "cpu", "note": "no CUDA device: a tiny shape with the naive reference and torch SDPA only "
                                     "(the Triton kernel needs a GPU; its CPU interpreter is far too slow to time)",
            "dtype": "float32", "shape": {"B": B, "Lq": Lq, "H": H, "D": D, "page_tokens": T},
            "flop_formula": FLOP_FORMULA, "timing": f"median of {a.iters} runs, time.perf_counter, 1 thread",
            "rows": rows}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="inferix bench attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--lk", type=int, nargs="+", default=[4680 * i for i in range(1, 8)],
                   help="total keys per query (context pages + the 4,680-token block); default 4,680..32,760")
    p.add_argument("--lq", type=int, default=4680, help="query tokens (one block)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-tokens", type=int, default=1560, help="tokens per page (one latent frame)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    p.add_argument("--sweep", action="store_true", help="also time several Triton tile configs at the largest Lk")
    p.add_argument("--cpu", action="store_true", help="run the CPU variant even when CUDA is present")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    result = run_cuda(a) if torch.cuda.is_available() and not a.cpu else run_cpu(a)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
