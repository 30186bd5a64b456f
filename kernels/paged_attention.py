"""Paged block attention: a FlashAttention-style forward over a KV page pool plus the block's own K/V.

One pass of block diffusion computes one block (a few latent frames) per batch row. Each query token of
row b sees

    [ the committed pages of row b, in block-table order | the block's own fresh K/V ]

with no mask anywhere (bidirectional inside the block). Pages live in per-layer pools
[num_pages, page_tokens, Hkv, D]; one page is one latent frame, so page_tokens is e.g. 1,560 (480x832)
and in general not a power of two. Block tables hold physical page ids in logical order (sink pages then
window pages), so ids are not contiguous and not sorted.

Kernel layout: one program per (query tile of BLOCK_M tokens, batch row, query head). It walks the row's
logical context in tiles of BLOCK_N tokens -- a tile may straddle pages; each token finds its page through
the block table -- and then the block's own keys. The context loop bound is the row's own length, so rows
with short context stop early (no computed-and-masked tiles). Softmax is the online (streaming) form with
fp32 running max/sum/accumulator; scores use exp2 with log2(e) folded into the scale.

Cache-relative RoPE (``cache_cos``/``cache_sin``): when the pool holds unrotated keys, the kernel rotates
each context key tile in registers (adjacent pairs) before the dot product. The dot is split into its even
and odd halves, q.k = q_even.k_even + q_odd.k_odd, so the pair rotation needs no register shuffles.

Also here: ``block_attention`` (no pool: dense or block-causal attention over q/k/v, used for whole-clip
passes) and ``TritonBackend``, the attention backend that the engine gets from ``get_backend("triton")``.

Tile autotuning (off by default): every launch uses one fixed tile config per head dim and dtype
(``_default_config``). With ``INFERIX_TRITON_AUTOTUNE=1`` in the environment (or ``autotune=True`` on a
launcher; explicit tile arguments win over the environment) the launch goes through ``triton.autotune``
over ``AUTOTUNE_CONFIGS``: query tile BLOCK_M, key tile BLOCK_N, num_warps and num_stages. The tuning key
is ``AUTOTUNE_KEY``: head dim, page tokens, query length, a context-length bucket (the keys a row can see --
block-table width x page tokens + its own keys -- rounded up to a power of two, known without a host sync),
the kernel's mode switches, and the tensor dtypes. The first launch of each key compiles and times every
candidate (seconds of GPU time: warm up before timing or capturing CUDA graphs); later launches in the
process reuse the winner (``TRITON_CACHE_AUTOTUNING=1`` keeps winners on disk across processes). On a GPU:

    pytest tests/kernels/test_paged_autotune.py    # every config natively vs the reference, bf16 Wan shape
    INFERIX_TRITON_AUTOTUNE=1 TRITON_PRINT_AUTOTUNING=1 python -m inferix.bench_attention --no-flex

the second prints the winning config per key (before the JSON) and the TFLOP/s with the winners; compare
with a run without the variable. Without a GPU the same test file checks every config in the interpreter and
compiles the candidates for sm_90 (shared memory, tensor cores, register spills).
"""
from __future__ import annotations

import math
import os
import time

import torch

from ._triton_utils import HAS_TRITON, LazyJIT, check_launchable, interpret_mode, next_pow2, tl, triton
from .attention import AttentionBackend, BlockCausalMeta, PagedMeta, SDPABackend
from .rope import reference_apply_rope
from .store_kv import store_kv

__all__ = ["paged_block_attention", "reference_paged_block_attention", "block_attention",
           "reference_block_attention", "TritonBackend", "attention_flops", "AUTOTUNE_CONFIGS", "AUTOTUNE_KEY",
           "autotune_enabled", "autotune_candidates"]


def attention_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int) -> int:
    """FLOPs of an attention forward, counting both matmuls (QK^T and PV) as 2 flops per MAC."""
    return 4 * batch * heads * q_len * k_len * head_dim


# ---------------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------------

def _paged_attention_kernel(
    Q, K, V, KP, VP, BT, CTX, COS, SIN, O,
    qk_scale,  # softmax scale * log2(e)
    L_q, L_k, T, H, GROUP, D, blk_tokens,
    ctx_bucket,  # unused by the code: part of the autotuning key (context length, rounded up to a power of 2)
    s_qb, s_qt, s_qh, s_qd,
    s_kb, s_kt, s_kh, s_kd,
    s_vb, s_vt, s_vh, s_vd,
    s_kpp, s_kpt, s_kph, s_kpd,
    s_vpp, s_vpt, s_vph, s_vpd,
    s_btb, s_btp,
    s_cb, s_ct, s_cd,
    s_ob, s_ot, s_oh, s_od,
    HAS_CTX: tl.constexpr, ROTATE: tl.constexpr, BLOCK_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    b64 = b.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L_q
    d_ok = offs_d < D
    q_rows = Q + b64 * s_qb + h * s_qh + offs_m.to(tl.int64)[:, None] * s_qt  # [BM, 1] row pointers

    if ROTATE:
        # q split into even / odd elements of the adjacent pairs: [BM, BLOCK_DH] each
        offs_h = tl.arange(0, BLOCK_DH)
        h_ok = offs_h < D // 2
        qmask = m_ok[:, None] & h_ok[None, :]
        qe = tl.load(q_rows + (2 * offs_h)[None, :] * s_qd, mask=qmask, other=0.0)
        qo = tl.load(q_rows + (2 * offs_h + 1)[None, :] * s_qd, mask=qmask, other=0.0)
        if UPCAST:
            qe = qe.to(tl.float32)
            qo = qo.to(tl.float32)
        cdt = qe.dtype
    else:
        q = tl.load(q_rows + offs_d[None, :] * s_qd, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        cdt = q.dtype

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # ---- committed context, read through the block table ------------------------------------------------
    if HAS_CTX:
        n_ctx = tl.load(CTX + b) * T
        for start in range(0, n_ctx, BLOCK_N):
            tok = start + offs_n  # logical context token ids of this tile, [BN]
            n_ok = tok < n_ctx
            lp = tok // T  # logical page of each token (a tile may straddle pages)
            page = tl.load(BT + b64 * s_btb + lp * s_btp, mask=n_ok, other=0).to(tl.int64)
            slot = (tok - lp * T).to(tl.int64)
            # int64: page * page_stride overflows int32 once a pool passes 2**31 elements
            k_rows = KP + (page * s_kpp + slot * s_kpt + kvh * s_kph)[:, None]  # [BN, 1]
            v_rows = VP + (page * s_vpp + slot * s_vpt + kvh * s_vph)[:, None]
            if ROTATE:
                kmask = n_ok[:, None] & h_ok[None, :]
                ke = tl.load(k_rows + (2 * offs_h)[None, :] * s_kpd, mask=kmask, other=0.0).to(tl.float32)
                ko = tl.load(k_rows + (2 * offs_h + 1)[None, :] * s_kpd, mask=kmask, other=0.0).to(tl.float32)
                c_ptr = b64 * s_cb + tok.to(tl.int64)[:, None] * s_ct + offs_h[None, :] * s_cd
                c = tl.load(COS + c_ptr, mask=kmask, other=0.0).to(tl.float32)
                s = tl.load(SIN + c_ptr, mask=kmask, other=0.0).to(tl.float32)
                re = (ke * c - ko * s).to(cdt)
                ro = (ke * s + ko * c).to(cdt)
                qk = tl.dot(qe, tl.trans(re), input_precision=DOT_PREC)
                qk += tl.dot(qo, tl.trans(ro), input_precision=DOT_PREC)
            else:
                k = tl.load(k_rows + offs_d[None, :] * s_kpd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                qk = tl.dot(q, tl.trans(k.to(cdt)), input_precision=DOT_PREC)
            v = tl.load(v_rows + offs_d[None, :] * s_vpd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            qk = tl.where(n_ok[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(cdt), v.to(cdt), acc * alpha[:, None], input_precision=DOT_PREC)
            m_i = m_new

    # ---- the block's own keys (bidirectional; block-causal for whole-clip passes) -----------------------
    kv_end = L_k
    if BLOCK_CAUSAL:
        # the last query of this tile sees keys up to the end of its own block
        last_q = tl.minimum(pid_m * BLOCK_M + BLOCK_M, L_q) - 1
        kv_end = tl.minimum(L_k, (last_q // blk_tokens + 1) * blk_tokens)
    k_base = K + b64 * s_kb + kvh * s_kh
    v_base = V + b64 * s_vb + kvh * s_vh
    for start in range(0, kv_end, BLOCK_N):
        tok = start + offs_n
        n_ok = tok < kv_end
        k_rows = k_base + tok.to(tl.int64)[:, None] * s_kt
        v_rows = v_base + tok.to(tl.int64)[:, None] * s_vt
        if ROTATE:
            kmask = n_ok[:, None] & h_ok[None, :]
            ke = tl.load(k_rows + (2 * offs_h)[None, :] * s_kd, mask=kmask, other=0.0).to(cdt)
            ko = tl.load(k_rows + (2 * offs_h + 1)[None, :] * s_kd, mask=kmask, other=0.0).to(cdt)
            qk = tl.dot(qe, tl.trans(ke), input_precision=DOT_PREC)
            qk += tl.dot(qo, tl.trans(ko), input_precision=DOT_PREC)
        else:
            k = tl.load(k_rows + offs_d[None, :] * s_kd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            qk = tl.dot(q, tl.trans(k.to(cdt)), input_precision=DOT_PREC)
        v = tl.load(v_rows + offs_d[None, :] * s_vd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        ok = n_ok[None, :]
        if BLOCK_CAUSAL:
            ok = ok & ((tok[None, :] // blk_tokens) <= (offs_m[:, None] // blk_tokens))
        qk = tl.where(ok, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(cdt), v.to(cdt), acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows of a partial query tile can have l == 0
    out = acc / l_i[:, None]
    o_ptrs = O + b64 * s_ob + h * s_oh + offs_m.to(tl.int64)[:, None] * s_ot + offs_d[None, :] * s_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


_paged_attention = LazyJIT(_paged_attention_kernel)


# ---------------------------------------------------------------------------------------------------------
# Autotuning (opt-in)
# ---------------------------------------------------------------------------------------------------------

# (block_m, block_n, num_warps, num_stages): today's fixed GPU configs first, then neighbours that matter
# for FlashAttention-style forwards on sm_80/sm_90 (smaller key tiles, pipeline depths, 64-query tiles). Kept
# short: the first launch of each key compiles and times every entry that survives ``autotune_candidates``.
# Compiled for sm_90 at head dim 128 (bf16) none of them spills registers; 128-query tiles with 4 warps do
# there (hundreds of bytes), so they are tried for head dims <= 64 only.
AUTOTUNE_CONFIGS = (
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (64, 32, 4, 2),
    (128, 32, 8, 3),
    (128, 64, 8, 4),
    (128, 64, 8, 2),
    (64, 64, 4, 3),
    (128, 32, 8, 2),
    (64, 32, 4, 4),
)
AUTOTUNE_KEY = ("D", "T", "L_q", "ctx_bucket", "HAS_CTX", "ROTATE", "BLOCK_CAUSAL")  # + tensor dtypes (Triton)
AUTOTUNE_ENV = "INFERIX_TRITON_AUTOTUNE"


def autotune_enabled() -> bool:
    """True when ``INFERIX_TRITON_AUTOTUNE=1`` (read at every launch; unset or 0: the fixed configs)."""
    val = os.environ.get(AUTOTUNE_ENV, "0").strip()
    if val not in ("", "0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV} must be 0 or 1, got {val!r}")
    return val == "1"


def autotune_candidates(q_len: int, head_dim: int, configs=AUTOTUNE_CONFIGS) -> list:
    """The configs worth timing for a query length and head dim: no query tile larger than the queries need
    (beyond the smallest one), no 128-query tile with 4 warps above head dim 64. Never empty."""
    need = max(16, next_pow2(q_len))
    smallest = min(c[0] for c in configs)
    keep = [c for c in configs if c[0] <= max(need, smallest)
            and not (next_pow2(head_dim) > 64 and c[0] >= 128 and c[2] < 8)]
    return keep or [min(configs, key=lambda c: (c[0], c[1]))]


def _prune_configs(configs, named_args, **_kwargs):
    """``early_config_prune`` hook: ``autotune_candidates`` on triton.Config objects."""
    as_tuple = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c for c in configs}
    return [as_tuple[t] for t in autotune_candidates(named_args["L_q"], named_args["D"], tuple(as_tuple))]


def _wall_clock_bench(fn, quantiles=None):
    """One timed call (ms), as [median, p20, p80]: the interpreter has no GPU benchmarker; its timings only
    let the autotuning path run end to end on CPU (they say nothing about GPU tiles)."""
    t = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


class _LazyAutotune(LazyJIT):
    """``LazyJIT`` whose kernel is wrapped in ``triton.autotune`` over ``AUTOTUNE_CONFIGS``."""

    def __getitem__(self, grid):
        if not HAS_TRITON:
            raise RuntimeError(f"{self.fn.__name__} needs the 'triton' package, which is not installed")
        if self._kernel is None or self._interpret != interpret_mode():
            self._interpret = interpret_mode()
            configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                       for bm, bn, w, st in AUTOTUNE_CONFIGS]
            self._kernel = triton.autotune(configs=configs, key=list(AUTOTUNE_KEY),
                                           prune_configs_by={"early_config_prune": _prune_configs},
                                           do_bench=_wall_clock_bench if self._interpret else None)(
                triton.jit(self.fn))
        return self._kernel[grid]


_paged_attention_autotuned = _LazyAutotune(_paged_attention_kernel)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32)


def _default_config(head_dim: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Tile sizes: large tiles in the interpreter (its cost is per program x tile, not per element);
    FlashAttention-2-like tiles on GPUs (fp32 inputs get smaller tiles: twice the shared memory)."""
    if interpret:
        return dict(block_m=64, block_n=64, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return dict(block_m=128, block_n=64, num_warps=4, num_stages=3)
    return dict(block_m=128, block_n=64, num_warps=8, num_stages=3)  # no spills on sm_90 (218-224 regs)


def _check_qkv(q, k, v, what):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{what}: q/k/v must be [B, L, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, L, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{what}: k/v must be [B={B}, Lk, Hkv, D={D}] and equal, got k {tuple(k.shape)} "
                         f"v {tuple(v.shape)}")
    hkv = k.shape[2]
    if hkv == 0 or H % hkv:
        raise ValueError(f"{what}: query heads {H} must be a multiple of key/value heads {hkv}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _FLOAT_TYPES:
            raise ValueError(f"{what}: {name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{what}: q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if D > 128:
        raise ValueError(f"{what}: head_dim {D} is larger than the kernel's limit of 128")


def _launch_args(q, k, v, k_pool, v_pool, block_tables, context_pages, cos, sin, *, scale, block_tokens,
                 block_m, block_n, num_warps, num_stages, interpret=None, autotune=False):
    """Output tensor, grid, positional and keyword arguments of one kernel launch (also used to compile
    the kernel ahead of time for a GPU target in the tests, with interpret=False). With autotune the
    tile constexprs and launch options are left to the autotuner and the grid is a function of them."""
    interpret = interpret_mode() if interpret is None else interpret
    B, L, H, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    has_ctx = k_pool is not None
    rotate = cos is not None
    defaults = _default_config(D, q.dtype, interpret)
    block_m = block_m or defaults["block_m"]
    block_n = block_n or defaults["block_n"]
    num_warps = num_warps or defaults["num_warps"]
    num_stages = num_stages or defaults["num_stages"]
    for name, val in (("block_m", block_m), ("block_n", block_n)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {val}")

    # The interpreter's bf16 dot is wrong, so it computes in fp32; fp32 inputs keep fp32 products (IEEE).
    upcast = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpret)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if has_ctx:
        bt, ctx, kp, vp, T = block_tables, context_pages, k_pool, v_pool, k_pool.shape[1]
    else:  # no pool: dummies that the kernel never reads (HAS_CTX is a compile-time switch)
        bt = ctx = torch.zeros(1, 1, dtype=torch.int32, device=q.device)
        kp, vp, T = k, v, 1
    if rotate:
        cos_strides = cos.stride()
    else:
        cos = sin = q  # never read
        cos_strides = (0, 0, 0)
    grid = ((L + block_m - 1) // block_m, B * H)
    # keys a row can see, known without a host sync: the table's width in pages, then the block's own keys
    ctx_bucket = max(16, next_pow2((bt.shape[1] * T if has_ctx else 0) + Lk))
    args = [q, k, v, kp, vp, bt, ctx, cos, sin, out,
            float(scale) * 1.4426950408889634,
            L, Lk, T, H, H // Hkv, D, block_tokens or 1, ctx_bucket,
            *q.stride(), *k.stride(), *v.stride(), *kp.stride(), *vp.stride(),
            bt.stride(0), bt.stride(1),
            *cos_strides, *out.stride()]
    kwargs = dict(HAS_CTX=has_ctx, ROTATE=rotate, BLOCK_CAUSAL=bool(block_tokens), UPCAST=upcast,
                  DOT_PREC="ieee" if upcast else "tf32", BLOCK_M=block_m, BLOCK_N=block_n,
                  BLOCK_D=max(16, next_pow2(D)), BLOCK_DH=max(16, next_pow2(D // 2)),
                  num_warps=num_warps, num_stages=num_stages)
    if autotune:
        for name in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"):
            del kwargs[name]
        grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
    return out, grid, args, kwargs


def _use_autotune(autotune, what, **tiles) -> bool:
    """Resolve the autotune switch: explicit tiles win over the environment; both explicit is an error."""
    named = [k for k, v in tiles.items() if v is not None]
    if autotune and named:
        raise ValueError(f"{what}: autotune=True picks the tiles itself; drop {', '.join(named)}")
    if autotune is None:
        return not named and autotune_enabled()
    return bool(autotune)


def _launch(*args, autotune=False, **kwargs):
    out, grid, a, kw = _launch_args(*args, autotune=autotune, **kwargs)
    if out.numel():
        (_paged_attention_autotuned if autotune else _paged_attention)[grid](*a, **kw)
    return out


def _check_paged(q, k, k_pool, v_pool, block_tables, context_pages, cache_cos, cache_sin, validate, what):
    B, L, H, D = q.shape
    Hkv = k.shape[2]
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"{what}: pools must be [num_pages, page_tokens, Hkv, D] and equal, got "
                         f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}")
    if k_pool.shape[2:] != (Hkv, D):
        raise ValueError(f"{what}: pool pages hold [{k_pool.shape[2]}, {k_pool.shape[3]}] heads x dim but "
                         f"k has [{Hkv}, {D}]")
    if k_pool.dtype not in _FLOAT_TYPES or v_pool.dtype not in _FLOAT_TYPES:
        raise ValueError(f"{what}: pool dtype {k_pool.dtype}/{v_pool.dtype} is not a float type")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what}: block_tables must be int32 [B={B}, max_pages], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if context_pages.shape != (B,) or context_pages.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what}: context_pages must be int32 [B={B}], got {context_pages.dtype} "
                         f"{tuple(context_pages.shape)}")
    if (cache_cos is None) != (cache_sin is None):
        raise ValueError(f"{what}: cache_cos and cache_sin go together")
    if cache_cos is not None:
        if D % 2:
            raise ValueError(f"{what}: rotating cached keys needs an even head_dim, got {D}")
        if (cache_cos.dim() != 3 or cache_cos.shape[0] != B or cache_cos.shape[2] != D // 2
                or cache_cos.shape != cache_sin.shape):
            raise ValueError(f"{what}: cache_cos/cache_sin must be [B={B}, >= context tokens, D/2={D // 2}], "
                             f"got {tuple(cache_cos.shape)} and {tuple(cache_sin.shape)}")
        if validate and B:
            longest = int(context_pages.max()) * k_pool.shape[1]
            if cache_cos.shape[1] < longest:
                raise ValueError(f"{what}: cache_cos covers {cache_cos.shape[1]} tokens but a row reads "
                                 f"{longest} context tokens")
    if validate and B:
        n = context_pages.long().cpu()
        if int(n.min()) < 0 or int(n.max()) > block_tables.shape[1]:
            raise ValueError(f"{what}: context_pages {n.tolist()} must lie in [0, {block_tables.shape[1]}] "
                             f"(the block table width)")
        bt = block_tables.cpu()
        for b in range(B):
            ids = bt[b, :int(n[b])]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k_pool.shape[0]):
                raise ValueError(f"{what}: row {b} reads page ids {ids.tolist()} outside the pool of "
                                 f"{k_pool.shape[0]} pages")


def paged_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                          v_pool: torch.Tensor, block_tables: torch.Tensor, context_pages: torch.Tensor,
                          cache_cos: torch.Tensor | None = None, cache_sin: torch.Tensor | None = None,
                          scale: float | None = None, *, validate: bool | None = None,
                          block_m: int | None = None, block_n: int | None = None,
                          num_warps: int | None = None, num_stages: int | None = None,
                          autotune: bool | None = None) -> torch.Tensor:
    """Attention of each row's block over [its committed pages | its own K/V].

    q [B, L, H, D]; k/v [B, L, Hkv, D] (the block's fresh keys, RoPE applied) with H a multiple of Hkv;
    k_pool/v_pool [num_pages, page_tokens, Hkv, D]; block_tables int32 [B, max_pages] (physical page ids
    in logical order); context_pages int32 [B] (leading entries of each row's table to read, may be 0).
    cache_cos/cache_sin [B, >= context tokens of the longest row, D/2]: set when the pool holds unrotated
    keys; the kernel rotates context keys by the angles of their logical position (token index in the
    row's context). Returns [B, L, H, D] in q's dtype.
    ``validate`` checks page ids against the pool (a host sync); default: only for CPU tensors.
    Tiles: block_m/block_n/num_warps/num_stages, else the fixed defaults, or ``triton.autotune`` when
    ``autotune`` is True (None: when INFERIX_TRITON_AUTOTUNE=1 and no tile is given).
    """
    what = "paged_block_attention"
    _check_qkv(q, k, v, what)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"{what}: the block's k/v must have the query length {q.shape[1]}, got {k.shape[1]}")
    if validate is None:
        validate = q.device.type == "cpu"
    _check_paged(q, k, k_pool, v_pool, block_tables, context_pages, cache_cos, cache_sin, validate, what)
    tensors = [q, k, v, k_pool, v_pool, block_tables, context_pages]
    if cache_cos is not None:
        tensors += [cache_cos, cache_sin]
    tune = _use_autotune(autotune, what, block_m=block_m, block_n=block_n, num_warps=num_warps,
                         num_stages=num_stages)
    check_launchable(what, *tensors)
    return _launch(q, k, v, k_pool, v_pool, block_tables, context_pages, cache_cos, cache_sin, scale=scale,
                   block_tokens=None, block_m=block_m, block_n=block_n, num_warps=num_warps,
                   num_stages=num_stages, autotune=tune)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_tokens: int | None = None,
                    scale: float | None = None, *, block_m: int | None = None, block_n: int | None = None,
                    num_warps: int | None = None, num_stages: int | None = None,
                    autotune: bool | None = None) -> torch.Tensor:
    """Attention without a pool: dense (block_tokens None) or block-causal (query token i sees keys j
    with j // block_tokens <= i // block_tokens; needs Lq == Lk). q [B, Lq, H, D], k/v [B, Lk, Hkv, D].
    Tiles and ``autotune`` as in ``paged_block_attention``."""
    what = "block_attention"
    _check_qkv(q, k, v, what)
    if block_tokens is not None:
        if block_tokens <= 0:
            raise ValueError(f"{what}: block_tokens must be positive, got {block_tokens}")
        if k.shape[1] != q.shape[1]:
            raise ValueError(f"{what}: block-causal attention needs Lq == Lk, got {q.shape[1]} and {k.shape[1]}")
    tune = _use_autotune(autotune, what, block_m=block_m, block_n=block_n, num_warps=num_warps,
                         num_stages=num_stages)
    check_launchable(what, q, k, v)
    return _launch(q, k, v, None, None, None, None, None, None, scale=scale, block_tokens=block_tokens,
                   block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages, autotune=tune)


# ---------------------------------------------------------------------------------------------------------
# References (deliberately naive; never edited to match the kernel)
# ---------------------------------------------------------------------------------------------------------

def reference_paged_block_attention(q, k, v, k_pool, v_pool, block_tables, context_pages, cache_cos=None,
                                    cache_sin=None, scale=None, **_ignored) -> torch.Tensor:
    """Same contract as ``paged_block_attention``: gather pages row by row, concatenate the block's own
    K/V, repeat KV heads, explicit softmax in fp32."""
    B, L, H, D = q.shape
    T = k_pool.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    outs = []
    for b in range(B):
        n = int(context_pages[b])
        pages = block_tables[b, :n].long()
        kc = k_pool[pages].reshape(n * T, *k_pool.shape[2:])  # [n*T, Hkv, D]
        vc = v_pool[pages].reshape(n * T, *v_pool.shape[2:])
        if cache_cos is not None and n:
            kc = reference_apply_rope(kc[None], cache_cos[b:b + 1, :n * T], cache_sin[b:b + 1, :n * T])[0]
        kk = torch.cat([kc.float(), k[b].float()], 0)  # [n*T + L, Hkv, D]
        vv = torch.cat([vc.float(), v[b].float()], 0)
        kk = kk.repeat_interleave(H // kk.shape[1], dim=1)  # [n*T + L, H, D]
        vv = vv.repeat_interleave(H // vv.shape[1], dim=1)
        s = torch.einsum("qhd,khd->hqk", q[b].float(), kk) * scale
        p = torch.softmax(s, dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", p, vv))
    return torch.stack(outs).to(q.dtype)


def reference_block_attention(q, k, v, block_tokens=None, scale=None, **_ignored) -> torch.Tensor:
    """Same contract as ``block_attention``: explicit softmax in fp32 with an explicit bool mask."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kk = k.float().repeat_interleave(H // k.shape[2], dim=2)  # [B, Lk, H, D]
    vv = v.float().repeat_interleave(H // v.shape[2], dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kk) * scale
    if block_tokens is not None:
        qb = torch.arange(Lq, device=q.device) // block_tokens
        kb = torch.arange(Lk, device=q.device) // block_tokens
        s = s.masked_fill(~(kb[None, :] <= qb[:, None]), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------------------------------------

class TritonBackend(AttentionBackend):
    """Paged passes, dense and block-causal clips in Triton; arbitrary bool masks fall back to SDPA.

    Cache-relative RoPE (``PagedMeta.cache_cos``) is handled inside the kernel (context keys rotated in
    registers), not by a fallback. Needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    """
    name = "triton"

    def attend(self, q, k, v, layer, meta, k_raw=None):
        if isinstance(meta, BlockCausalMeta):
            return block_attention(q, k, v, block_tokens=meta.frame_tokens * meta.block_frames)
        return super().attend(q, k, v, layer, meta, k_raw=k_raw)

    def store(self, k_pool, v_pool, k, v, write_pages):
        store_kv(k_pool, v_pool, k, v, write_pages)

    def masked(self, q, k, v, mask):
        if mask is None:
            return block_attention(q, k, v)
        return SDPABackend().masked(q, k, v, mask)

    def paged(self, q, k, v, layer, meta: PagedMeta):
        kp, vp = meta.pool.k[layer], meta.pool.v[layer]  # may differ in dtype: tiles convert on load
        return paged_block_attention(q, k, v, kp, vp, meta.block_tables, meta.context_pages,
                                     cache_cos=meta.cache_cos, cache_sin=meta.cache_sin)
