"""FP8 weights for the causal Wan DiT: float8_e4m3fn Linear weights with per-row (or per-tensor) scales.

Which layers: every ``nn.Linear`` of the transformer blocks (self- and cross-attention q/k/v/o, the FFN).
The patch embedding, text and time embeddings, time projection, action embedding and output head keep their
dtype (bf16 on GPU): they hold a small share of the weights and sit where an error reaches every token (the
conditioning) or the prediction directly (the head).

Two backends, chosen by ``quantize_dit_fp8(backend=...)`` ("auto": torchao for CUDA weights, else emulate):

* ``torchao`` (CUDA, compute capability 8.9+: Ada, Hopper): ``torchao.quantization.quantize_`` with
  ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``: e4m3 weights with one scale per
  output row, each input quantized per token at run time, FP8 tensor-core matmuls (``torch._scaled_mm``).
  ``activations=False`` uses ``Float8WeightOnlyConfig`` instead (FP8 storage, bf16 matmuls). torchao is an
  optional dependency: ``pip install 'inferix[fp8]'``.
* ``emulate`` (any device): each Linear becomes an ``FP8Linear`` holding the e4m3 weight and its fp32
  scales; it quantizes its input the same way and multiplies the dequantized values in fp32 (weight-only:
  in the input's dtype). The rounding is torchao's (scale = amax / 448 in the tensor's dtype, round to
  nearest e4m3); only the matmul's accumulation order differs. No speed-up: it is there to check the
  numerics of FP8 weights on a CPU.

Error of one weight: with s = amax / 448 (amax of its row, or of the tensor), |w/s| <= 448 and rounding to
e4m3 (3 mantissa bits, smallest normal 2^-6, subnormal step 2^-9) costs at most half a step, so
|w_fp8 - w| <= max(2^-4 |w|, 2^-10 s): 6.25 % relative for the normal range, 2^-10 * amax / 448 absolute below.

Quantize after loading weights (and merging LoRAs): quantized layers do not load the original state dict.
An all-zero row has scale 0, which torchao turns into NaN: the torchao backend refuses such weights; the
emulation gives zero rows (of weights or inputs) scale 1, i.e. exact zeros.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DIT_FP8_EXCLUDE", "GRANULARITIES", "FP8_MAX", "FP8Linear", "fp8_targets", "fp8_filter",
           "fp8_quantize", "fp8_dequantize", "fp8_error_bound", "quantize_dit_fp8"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# module name prefixes of CausalWanDiT that keep their dtype
DIT_FP8_EXCLUDE = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "action_embedding",
                   "head")
GRANULARITIES = ("row", "tensor")
BACKENDS = ("auto", "torchao", "emulate")


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(map(repr, GRANULARITIES))}, got {granularity!r}")


def fp8_quantize(x: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 data like x, fp32 scale [..., 1] per row or [1, ..., 1] per tensor) with
    x ~ data * scale. The scale is amax / 448 computed in x's dtype (as torchao does); rows of zeros get 1."""
    _check_granularity(granularity)
    if granularity == "row":
        amax = x.abs().amax(dim=-1, keepdim=True)
    else:
        amax = x.abs().amax().reshape([1] * x.dim())
    scale = (amax / FP8_MAX).to(torch.float32)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    data = (x.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return data, scale


def fp8_dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (data.to(torch.float32) * scale).to(dtype)


def fp8_error_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest |dequantize(quantize(w)) - w| per element: half an e4m3 step at w's magnitude (see the module
    docstring), max(2^-4 |w|, 2^-10 scale)."""
    return torch.maximum(w.abs().float() * 2.0 ** -4, scale.expand_as(w) * 2.0 ** -10)


class FP8Linear(nn.Module):
    """Emulated FP8 Linear: e4m3 weight + fp32 scales; e4m3 inputs (per token) and an fp32 matmul, or with
    activations=False the input's dtype and a matmul in it."""

    def __init__(self, linear: nn.Linear, granularity: str = "row", activations: bool = True):
        super().__init__()
        _check_granularity(granularity)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.granularity, self.activations = granularity, activations
        self.weight_dtype = linear.weight.dtype
        data, scale = fp8_quantize(linear.weight.detach(), granularity)
        self.register_buffer("weight_fp8", data)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def dequantized_weight(self) -> torch.Tensor:
        return fp8_dequantize(self.weight_fp8, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.activations:  # as torchao's weight-only path: dequantize to x's dtype, matmul there
            out = torch.matmul(x, fp8_dequantize(self.weight_fp8, self.weight_scale, x.dtype).t())
            return out if self.bias is None else out + self.bias
        xf = fp8_dequantize(*fp8_quantize(x, self.granularity))
        bias = None if self.bias is None else self.bias.float()
        return F.linear(xf, self.dequantized_weight(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, granularity={self.granularity}"
                f", activations={'fp8' if self.activations else 'kept'}, bias={self.bias is not None}")


def fp8_targets(model: nn.Module, exclude: tuple = DIT_FP8_EXCLUDE) -> list[str]:
    """Names of the Linear layers that get FP8 weights: every not yet quantized ``nn.Linear`` whose name is not
    an excluded prefix or below one."""
    def excluded(name):
        return any(name == p or name.startswith(p + ".") for p in exclude)

    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and type(m.weight) is nn.Parameter and not excluded(name)]


def fp8_filter(targets) -> Callable[[nn.Module, str], bool]:
    """torchao's ``filter_fn(module, fqn)``: True exactly for the Linear layers named in ``targets``."""
    names = frozenset(targets)
    return lambda module, fqn: isinstance(module, nn.Linear) and fqn in names


def _check_fp8_device(device: torch.device) -> None:
    """FP8 matmuls need CUDA compute capability 8.9+ (torch._scaled_mm on Ada/Hopper)."""
    if device.type != "cuda":
        raise RuntimeError(f"FP8 matmuls need a CUDA GPU of compute capability 8.9+ (Ada, Hopper), the weights "
                           f"are on {device}; use backend='emulate' there")
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        raise RuntimeError(f"FP8 matmuls need compute capability 8.9+ (Ada, Hopper); "
                           f"{torch.cuda.get_device_name(device)} is sm_{cc[0]}{cc[1]}; use backend='emulate'")


def _import_torchao():
    try:
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig,
                                          PerRow, PerTensor, quantize_)
    except ImportError as e:
        raise RuntimeError(f"FP8 weights on CUDA need torchao>=0.18 ({e}): pip install 'inferix[fp8]'") from None
    return quantize_, Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow, PerTensor


def _quantize_torchao(model, targets, granularity, activations):
    modules = dict(model.named_modules())
    for name in targets:
        w = modules[name].weight
        if w.shape[0] % 16 or w.shape[1] % 16:
            raise ValueError(f"quantize_dit_fp8: {name} has weight {list(w.shape)}; FP8 matmuls need both dims "
                             f"to be multiples of 16 (exclude the layer or use backend='emulate')")
        if granularity == "row" and w.dtype != torch.bfloat16:
            raise ValueError(f"quantize_dit_fp8: per-row FP8 in torchao needs bfloat16 weights, {name} is "
                             f"{w.dtype}; cast the model with .to(torch.bfloat16) first")
        if granularity == "row" and bool((w.detach().abs().amax(dim=1) == 0).any()):
            raise ValueError(f"quantize_dit_fp8: {name} has an all-zero weight row, whose FP8 scale 0 gives NaN "
                             f"in torchao; exclude the layer")
    quantize_, Dynamic, WeightOnly, PerRow, PerTensor = _import_torchao()
    gran = PerRow() if granularity == "row" else PerTensor()
    # inferix does not torch.compile the DiT: leave torch._inductor's global settings alone
    config = (Dynamic(granularity=gran, set_inductor_config=False) if activations
              else WeightOnly(granularity=gran, set_inductor_config=False))
    quantize_(model, config, filter_fn=fp8_filter(targets))


def quantize_dit_fp8(dit: nn.Module, *, granularity: str = "row", activations: bool = True,
                     backend: str = "auto", exclude: tuple = DIT_FP8_EXCLUDE) -> nn.Module:
    """Give the DiT's block Linear layers FP8 (e4m3) weights, in place; returns ``dit``.

    granularity: "row" (one scale per output channel) or "tensor". activations: also quantize each Linear's
    input to FP8 per token (per tensor with "tensor") at run time, as FP8 matmuls need; False keeps inputs in
    their dtype (weight-only: memory, not matmul speed). backend: "torchao" (CUDA SM89+), "emulate" (any
    device, ``FP8Linear``) or "auto" (torchao when the weights are on CUDA). exclude: name prefixes that keep
    their dtype (default: embeddings and head of ``CausalWanDiT``).
    """
    _check_granularity(granularity)
    if isinstance(dit, nn.Linear):
        raise ValueError("quantize_dit_fp8 replaces the Linear layers inside a model, got a bare nn.Linear")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    targets = fp8_targets(dit, exclude)
    if not targets:
        done = any(isinstance(m, FP8Linear) for m in dit.modules())
        raise ValueError(f"quantize_dit_fp8: {type(dit).__name__} has no nn.Linear layers to quantize outside "
                         f"{', '.join(exclude)}" + (" (it already has FP8 layers)" if done else ""))
    modules = dict(dit.named_modules())
    device = modules[targets[0]].weight.device
    if backend == "auto":
        backend = "torchao" if device.type == "cuda" else "emulate"
    if backend == "torchao":
        _check_fp8_device(device)
        _quantize_torchao(dit, targets, granularity, activations)
        return dit
    for name in targets:
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else dit, child, FP8Linear(modules[name], granularity, activations))
    return dit
