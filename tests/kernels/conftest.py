"""Kernel tests: Triton kernels against their naive torch references.

Without CUDA the kernels run in Triton's CPU interpreter, which has to be switched on before any kernel is
decorated (the kernels of this package are decorated on first launch, but set it first anyway). With CUDA
and no TRITON_INTERPRET in the environment, every test runs natively on the GPU.
"""
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def native_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


@pytest.fixture
def device() -> str:
    """Where the ordinary (small) tests run: the GPU when kernels run natively, else the interpreter."""
    return "cuda" if native_gpu() else "cpu"


def pytest_collection_modifyitems(config, items):
    # The one honest skip: GPU-native tests need a CUDA device (and kernels that are not interpreted).
    here = Path(__file__).parent
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
    elif not native_gpu():
        skip = pytest.mark.skip(reason="TRITON_INTERPRET=1 is set, so kernels would not run natively")
    else:
        return
    for item in items:
        if "gpu" in item.keywords and here in Path(item.path).parents:
            item.add_marker(skip)
