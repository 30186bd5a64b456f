"""The kernels also build for a real GPU: compile them ahead of time for sm_90 (H100) on any machine.

The interpreter checks what the kernels compute but not that Triton's compiler accepts them (typing of
loop-carried values, constexpr branches, dot shapes) or that the production tile sizes fit. Here the real
compiler runs down to a cubin, with the launchers' own arguments on meta tensors (no GPU, no launch), and
the configurations used for the Wan shapes are checked for shared memory, tensor-core use and register
spills. A process that has imported triton with TRITON_INTERPRET=1 cannot compile (triton's own library
functions are interpreted there), so the compilation runs in a child process: this file is its script.
"""
import json
import os
import subprocess
import sys

import pytest

H100_SMEM = 227 * 1024

# name: (dtype, head_dim, heads, kv_heads, page_tokens, raw-key RoPE, block-causal block tokens)
PAGED_CASES = {
    "wan-1.3b paged bf16": ("bfloat16", 128, 12, 12, 1560, False, None),
    "small pages, GQA, raw-key RoPE, fp16": ("float16", 64, 8, 2, 16, True, None),
    "raw-key RoPE bf16 d128": ("bfloat16", 128, 12, 12, 1560, True, None),
    "block-causal clip bf16": ("bfloat16", 128, 12, 12, 1560, False, 4680),
}


def compile_all() -> dict:
    """Compile every case for sm_90; returns {name: {shared, tensor_cores, spills}}."""
    import torch

    from inferix.kernels import paged_attention as pa
    from inferix.kernels import rope, store_kv
    from inferix.kernels._triton_utils import aot_compile, spilled_bytes

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    def summary(k):
        ptx = k.asm["ptx"]
        return dict(shared=k.metadata.shared, tensor_cores="wgmma" in ptx or "mma.sync" in ptx,
                    spills=spilled_bytes(k))

    results = {}
    for name, (dt, D, H, Hkv, T, rotate, block_tokens) in PAGED_CASES.items():
        dtype = getattr(torch, dt)
        B, L = 1, 4680
        q, k, v = meta(B, L, H, D, dtype=dtype), meta(B, L, Hkv, D, dtype=dtype), meta(B, L, Hkv, D, dtype=dtype)
        pool = None if block_tokens else meta(64, T, Hkv, D, dtype=dtype)
        bt = None if block_tokens else meta(B, 21, dtype=torch.int32)
        ctx = None if block_tokens else meta(B, dtype=torch.int32)
        cos = meta(B, 21 * T, D // 2, dtype=torch.float32) if rotate else None
        _, _, args, kwargs = pa._launch_args(q, k, v, pool, pool, bt, ctx, cos, cos, scale=None,
                                             block_tokens=block_tokens, block_m=None, block_n=None,
                                             num_warps=None, num_stages=None, interpret=False)
        results[name] = summary(aot_compile(pa._paged_attention, args, kwargs, arch=90))

    k = meta(2, 4680, 12, 128)
    pool = meta(64, 1560, 12, 128)
    _, args, kwargs = store_kv._launch_args(pool, pool, k, k, meta(2, 3, dtype=torch.int32), interpret=False)
    results["store_kv"] = summary(aot_compile(store_kv._store_kv, args, kwargs, arch=90))
    cos = meta(2, 4680, 64, dtype=torch.float32)
    _, _, args, kwargs = rope._launch_args(k, k, cos, cos, interpret=False)
    results["rope q+k"] = summary(aot_compile(rope._rope, args, kwargs, arch=90))
    return results


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ahead-of-time compilation failed:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(PAGED_CASES) + ["store_kv", "rope q+k"])
def test_builds_for_sm90(compiled, name):
    r = compiled[name]
    assert r["shared"] <= H100_SMEM, f"{name}: {r['shared']} bytes of shared memory"
    if name in PAGED_CASES:
        assert r["tensor_cores"], f"{name}: no tensor-core instructions in the PTX"
    assert r["spills"] in (None, 0), f"{name}: {r['spills']} bytes of register spills"


if __name__ == "__main__":
    print(json.dumps(compile_all()))
