"""Opt-in tile autotuning of the paged attention kernel.

Every config of ``AUTOTUNE_CONFIGS`` is launched explicitly (not only the autotuner's pick) and compared with
the naive reference, so a config that breaks the kernel (a tile that straddles pages wrongly, a partial query
tile) fails here. The autotuned launch itself runs end to end (in the interpreter with a wall-clock timer
instead of the GPU benchmarker), the switch leaves the fixed configs alone when it is off, and the configs
the autotuner may time on the Wan shapes are compiled for sm_90 (shared memory, tensor cores, spills) in a
child process, as in test_compile_sm90.py.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from inferix.kernels import paged_attention as pa
from inferix.kernels.paged_attention import (AUTOTUNE_CONFIGS, AUTOTUNE_KEY, autotune_candidates,
                                             autotune_enabled, block_attention, paged_block_attention,
                                             reference_block_attention, reference_paged_block_attention)
from inferix.kernels.rope import rope_angles, rope_cos_sin
from test_paged_attention import TOL, check, make_case

H100_SMEM = 227 * 1024
CONFIG_IDS = ["bm{}-bn{}-w{}-s{}".format(*c) for c in AUTOTUNE_CONFIGS]


def tiles(c):
    return dict(block_m=c[0], block_n=c[1], num_warps=c[2], num_stages=c[3])


@pytest.fixture(autouse=True)
def no_env_flag(monkeypatch):
    monkeypatch.delenv(pa.AUTOTUNE_ENV, raising=False)


# ---- every config against the reference ---------------------------------------------------------------------

@pytest.mark.parametrize("config", AUTOTUNE_CONFIGS, ids=CONFIG_IDS)
def test_every_config_paged(device, config):
    # L=136: 128-query tiles get one full and one partial tile, 64-query tiles two full and one partial;
    # 24-token pages: every key tile size straddles pages; rows read 5, 0 and 2 pages; GQA 4:2
    case = make_case(B=3, L=136, H=4, Hkv=2, D=32, T=24, ctx=[5, 0, 2], num_pages=10, dtype=torch.float32,
                     device=device, sink=1, seed=20)
    check(case, torch.float32, **tiles(config))


@pytest.mark.parametrize("config", AUTOTUNE_CONFIGS, ids=CONFIG_IDS)
def test_every_config_raw_key_rope(device, config):
    B, T, D = 2, 16, 32
    case = make_case(B=B, L=72, H=2, Hkv=1, D=D, T=T, ctx=[9, 3], num_pages=14, dtype=torch.float32,
                     device=device, seed=21)
    width = case["block_tables"].shape[1]
    cos, sin = rope_cos_sin(rope_angles(torch.arange(width)[None].expand(B, width), 4, 4, D))
    cdt = torch.float64 if device == "cpu" else torch.float32
    check(dict(case, cache_cos=cos.to(device, cdt), cache_sin=sin.to(device, cdt)), torch.float32,
          **tiles(config))


@pytest.mark.parametrize("config", AUTOTUNE_CONFIGS, ids=CONFIG_IDS)
def test_every_config_block_causal(device, config):
    # 40-token blocks end inside every tile size; 136 tokens leave partial query and key tiles
    g = torch.Generator().manual_seed(22)
    q = torch.randn(1, 136, 2, 32, generator=g).to(device)
    k = torch.randn(1, 136, 1, 32, generator=g).to(device)
    v = torch.randn(1, 136, 1, 32, generator=g).to(device)
    out = block_attention(q, k, v, block_tokens=40, **tiles(config))
    ref = reference_block_attention(q, k, v, block_tokens=40)
    assert (out - ref).abs().max().item() < TOL[torch.float32]


# ---- the autotuned launch ------------------------------------------------------------------------------------

def test_autotuned_launch_matches_reference_and_keys_on_shape(device):
    case = make_case(B=2, L=40, H=2, Hkv=1, D=32, T=24, ctx=[3, 1], num_pages=8, dtype=torch.float32,
                     device=device, seed=23)
    out = paged_block_attention(**case, autotune=True)
    ref = reference_paged_block_attention(**case)
    assert (out - ref).abs().max().item() < TOL[torch.float32]
    tuner = pa._paged_attention_autotuned._kernel
    picked = tuner.best_config
    assert (picked.kwargs["BLOCK_M"], picked.kwargs["BLOCK_N"], picked.num_warps, picked.num_stages) in \
        autotune_candidates(40, 32)
    width = case["block_tables"].shape[1]
    key = (32, 24, 40, pa.next_pow2(width * 24 + 40), True, False, False)  # D, T, L_q, bucket, switches
    assert any(k[:len(AUTOTUNE_KEY)] == key for k in tuner.cache), f"{key} not in {list(tuner.cache)}"
    # a longer table lands in another context bucket: a new key, tuned separately
    wide = dict(case, block_tables=torch.cat([case["block_tables"]] * 4, 1))
    n_keys = len(tuner.cache)
    out2 = paged_block_attention(**wide, autotune=True)
    assert (out2 - out).abs().max().item() < TOL[torch.float32]
    assert len(tuner.cache) == n_keys + 1


def test_autotuned_block_causal(device):
    g = torch.Generator().manual_seed(24)
    q, k, v = (torch.randn(1, 48, 2, 16, generator=g).to(device) for _ in range(3))
    out = block_attention(q, k, v, block_tokens=16, autotune=True)
    assert (out - reference_block_attention(q, k, v, block_tokens=16)).abs().max().item() < TOL[torch.float32]


# ---- the switch ----------------------------------------------------------------------------------------------

def test_flag_off_keeps_the_fixed_config(monkeypatch, device):
    seen = []
    real = pa._launch_args
    monkeypatch.setattr(pa, "_launch_args", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    case = make_case(B=1, L=16, H=2, Hkv=2, D=32, T=16, ctx=[1], num_pages=3, dtype=torch.float32,
                     device=device, seed=25)
    paged_block_attention(**case)
    monkeypatch.setenv(pa.AUTOTUNE_ENV, "0")
    paged_block_attention(**case)
    assert [kw["autotune"] for kw in seen] == [False, False]
    _, grid, _, kwargs = real(*[case[n] for n in ("q", "k", "v", "k_pool", "v_pool", "block_tables",
                                                   "context_pages")], None, None, scale=None, block_tokens=None,
                              block_m=None, block_n=None, num_warps=None, num_stages=None, interpret=False)
    fixed = pa._default_config(32, torch.float32, interpret=False)
    assert (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"]) == \
        (fixed["block_m"], fixed["block_n"], fixed["num_warps"], fixed["num_stages"])
    assert isinstance(grid, tuple)


def test_env_flag_turns_it_on_and_explicit_tiles_win(monkeypatch, device):
    seen = []
    real = pa._launch
    monkeypatch.setattr(pa, "_launch", lambda *a, **kw: seen.append(kw["autotune"]) or real(*a, **kw))
    monkeypatch.setenv(pa.AUTOTUNE_ENV, "1")
    assert autotune_enabled()
    case = make_case(B=1, L=16, H=2, Hkv=2, D=32, T=16, ctx=[1], num_pages=3, dtype=torch.float32,
                     device=device, seed=26)
    ref = reference_paged_block_attention(**case)
    for launch in (dict(), dict(block_m=16, block_n=16), dict(autotune=False)):
        out = paged_block_attention(**case, **launch)
        assert (out - ref).abs().max().item() < TOL[torch.float32]
    assert seen == [True, False, False]


def test_bad_switches_are_one_line_errors(monkeypatch, device):
    case = make_case(B=1, L=16, H=2, Hkv=2, D=32, T=16, ctx=[1], num_pages=3, dtype=torch.float32,
                     device=device, seed=27)
    with pytest.raises(ValueError, match="autotune=True picks the tiles itself; drop block_m, num_warps"):
        paged_block_attention(**case, autotune=True, block_m=32, num_warps=4)
    with pytest.raises(ValueError, match="drop block_n"):
        block_attention(case["q"], case["k"], case["v"], autotune=True, block_n=32)
    monkeypatch.setenv(pa.AUTOTUNE_ENV, "yes")
    with pytest.raises(ValueError, match="INFERIX_TRITON_AUTOTUNE must be 0 or 1, got 'yes'"):
        paged_block_attention(**case)


# ---- the config list -----------------------------------------------------------------------------------------

def test_config_list_and_pruning():
    assert len(set(AUTOTUNE_CONFIGS)) == len(AUTOTUNE_CONFIGS)
    for bm, bn, w, s in AUTOTUNE_CONFIGS:
        assert bm in (64, 128) and bn in (32, 64, 128) and w in (4, 8) and s in (2, 3, 4)
    # today's fixed GPU configs are candidates where they apply, so tuning can only match or beat them
    for D, dtype in ((128, torch.bfloat16), (64, torch.float16), (128, torch.float32)):
        c = pa._default_config(D, dtype, interpret=False)
        assert (c["block_m"], c["block_n"], c["num_warps"], c["num_stages"]) in autotune_candidates(4680, D)
    wan = autotune_candidates(4680, 128)
    assert all(not (bm == 128 and w == 4) for bm, _, w, _ in wan) and len(wan) == len(AUTOTUNE_CONFIGS) - 1
    assert autotune_candidates(4680, 64) == list(AUTOTUNE_CONFIGS)
    short = autotune_candidates(40, 64)  # 40 queries: 64-query tiles only
    assert short and all(bm == 64 for bm, *_ in short)
    assert autotune_candidates(16, 128, configs=((128, 64, 4, 3), (128, 32, 4, 3))) == [(128, 32, 4, 3)]


def test_key_names_are_kernel_arguments():
    import inspect

    names = list(inspect.signature(pa._paged_attention_kernel).parameters)
    assert set(AUTOTUNE_KEY) <= set(names)
    # triton itself rejects unknown key names at decoration time
    pa._paged_attention_autotuned[(1,)]  # builds the autotuner (no launch)


# ---- GPU: every config compiles for sm_90 without spills, and runs natively ---------------------------------

# name: (dtype, head_dim, heads, kv_heads, page_tokens, raw-key RoPE, block-causal block tokens)
AOT_CASES = {
    "wan-1.3b paged bf16": ("bfloat16", 128, 12, 12, 1560, False, None),
    "raw-key RoPE bf16 d128": ("bfloat16", 128, 12, 12, 1560, True, None),
    "small pages, GQA, raw-key RoPE, fp16 d64": ("float16", 64, 8, 2, 16, True, None),
    "block-causal clip bf16": ("bfloat16", 128, 12, 12, 1560, False, 4680),
}


def compile_candidates() -> dict:
    """Compile every candidate config of every case for sm_90: {case: {config: {shared, tensor_cores,
    spills}}}."""
    from inferix.kernels._triton_utils import aot_compile, spilled_bytes

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    results = {}
    for name, (dt, D, H, Hkv, T, rotate, block_tokens) in AOT_CASES.items():
        dtype = getattr(torch, dt)
        B, L = 1, 4680
        q, k = meta(B, L, H, D, dtype=dtype), meta(B, L, Hkv, D, dtype=dtype)
        pool = None if block_tokens else meta(64, T, Hkv, D, dtype=dtype)
        bt = None if block_tokens else meta(B, 21, dtype=torch.int32)
        ctx = None if block_tokens else meta(B, dtype=torch.int32)
        cos = meta(B, 21 * T, D // 2, dtype=torch.float32) if rotate else None
        results[name] = {}
        for c in autotune_candidates(L, D):
            _, _, args, kwargs = pa._launch_args(q, k, k, pool, pool, bt, ctx, cos, cos, scale=None,
                                                 block_tokens=block_tokens, interpret=False, **tiles(c))
            compiled = aot_compile(pa._paged_attention, args, kwargs, arch=90)
            ptx = compiled.asm["ptx"]
            results[name][str(list(c))] = dict(shared=compiled.metadata.shared,
                                               tensor_cores="wgmma" in ptx or "mma.sync" in ptx,
                                               spills=spilled_bytes(compiled))
    return results


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"ahead-of-time compilation failed:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(AOT_CASES))
def test_candidates_build_for_sm90(compiled, name):
    D = AOT_CASES[name][1]
    assert set(compiled[name]) == {str(list(c)) for c in autotune_candidates(4680, D)}
    for config, r in compiled[name].items():
        assert r["shared"] <= H100_SMEM, f"{name} {config}: {r['shared']} bytes of shared memory"
        assert r["tensor_cores"], f"{name} {config}: no tensor-core instructions in the PTX"
        assert r["spills"] in (None, 0), f"{name} {config}: {r['spills']} bytes of register spills"


@pytest.mark.gpu
@pytest.mark.parametrize("config", AUTOTUNE_CONFIGS, ids=CONFIG_IDS)
def test_gpu_every_config_wan_shape(config):
    case = make_case(B=2, L=1560, H=12, Hkv=12, D=128, T=1560, ctx=[4, 1], num_pages=8, dtype=torch.bfloat16,
                     device="cuda", sink=1, seed=28)
    check(case, torch.bfloat16, **tiles(config))


@pytest.mark.gpu
def test_gpu_autotuned_wan_shape():
    case = make_case(B=2, L=1560, H=12, Hkv=12, D=128, T=1560, ctx=[4, 1], num_pages=8, dtype=torch.bfloat16,
                     device="cuda", sink=1, seed=29)
    check(case, torch.bfloat16, autotune=True)
    picked = pa._paged_attention_autotuned._kernel.best_config
    assert (picked.kwargs["BLOCK_M"], picked.kwargs["BLOCK_N"], picked.num_warps, picked.num_stages) in \
        autotune_candidates(1560, 128)


if __name__ == "__main__":
    print(json.dumps(compile_candidates()))
