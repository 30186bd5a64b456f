"""Small helpers shared by the Triton kernels of this folder.

Kernels are decorated lazily (on first launch), not at import time: ``triton.jit`` decides between the
compiled and the interpreted (``TRITON_INTERPRET=1``) implementation when it runs, and this package is
imported by the models long before a test's conftest or a user's environment has had its say. A kernel
decorated too early is stuck in compiled mode and fails on a CPU-only machine with "0 active drivers".
(The other way round does not work: once triton itself was imported with TRITON_INTERPRET=1, its library
functions are interpreted and nothing compiles in that process; see ``aot_compile``.)
"""
from __future__ import annotations

import os

import torch

try:  # triton is a Linux-only dependency; the references work without it
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "LazyJIT", "interpret_mode", "check_launchable", "next_pow2", "aot_compile",
           "spilled_bytes", "triton", "tl"]


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class LazyJIT:
    """A kernel function that is handed to ``triton.jit`` on first launch (``kernel[grid](...)``)."""

    def __init__(self, fn):
        self.fn = fn
        self._kernel = None
        self._interpret = None

    def __getitem__(self, grid):
        if not HAS_TRITON:
            raise RuntimeError(f"{self.fn.__name__} needs the 'triton' package, which is not installed")
        if self._kernel is None or self._interpret != interpret_mode():
            self._interpret = interpret_mode()
            self._kernel = triton.jit(self.fn)
        return self._kernel[grid]


def check_launchable(what: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error when tensors cannot be handed to a Triton kernel here."""
    if not HAS_TRITON:
        raise RuntimeError(f"{what} needs the 'triton' package, which is not installed")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{what}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    dev = next(iter(devices))
    if dev.type == "cuda":
        return
    if dev.type == "cpu" and interpret_mode():
        return
    raise RuntimeError(f"{what} runs on CUDA tensors (or on CPU tensors in Triton's interpreter: set "
                       f"TRITON_INTERPRET=1 in the environment); got tensors on {dev}")


_SIG_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
              torch.int32: "i32", torch.int64: "i64"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def aot_compile(kernel: LazyJIT, args: list, kwargs: dict, arch: int = 90):
    """Compile a kernel for an NVIDIA GPU of compute capability ``arch`` without a GPU or a launch.

    ``args``/``kwargs`` are what the launcher would pass (tensors may live on the meta device). Integer
    arguments are specialized the way the JIT does it (== 1 becomes a constant, multiples of 16 carry a
    divisibility hint; tensors are assumed 16-byte aligned). Returns the compiled kernel (``.asm`` holds
    ttir/ttgir/llir/ptx/cubin, ``.metadata.shared`` the shared memory in bytes). Compilation needs only
    the ptxas that ships with the triton wheel, so CPU-only machines can check that kernels build -- but
    only in a process that imported triton without TRITON_INTERPRET=1 (run it in a child process).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(kernel.fn)  # compiled-mode function whatever TRITON_INTERPRET says
    names = fn.arg_names
    options = {k: v for k, v in kwargs.items() if k in _LAUNCH_OPTIONS}
    constexprs = {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
    if len(args) + len(constexprs) != len(names):
        raise ValueError(f"{fn.__name__} takes {len(names)} arguments, got {len(args)} + {len(constexprs)}")
    signature, attrs = {}, {}
    for i, (name, a) in enumerate(zip(names, args)):
        if isinstance(a, torch.Tensor):
            signature[name] = "*" + _SIG_TYPES[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool):
            signature[name] = "i1"
        elif isinstance(a, int):
            if a == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -2 ** 31 <= a < 2 ** 31 else "i64"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={a!r}")
    for name in constexprs:
        signature[name] = "constexpr"
    src = ASTSource(fn, signature, constexprs, attrs)
    # constexpr functions in triton.language check the switch at compile time: keep it off meanwhile
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def spilled_bytes(compiled) -> int | None:
    """Bytes of register spills (local memory / stack) in a compiled kernel's cubin, via the cuobjdump that
    ships with triton; None when that tool is not there."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    stack = [int(m) for m in re.findall(r"STACK:(\d+)", text)]
    local = [int(m) for m in re.findall(r"LOCAL:(\d+)", text)]
    return sum(stack) + sum(local)
