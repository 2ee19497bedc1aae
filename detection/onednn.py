"""fp32 fully connected layers through oneDNN on the CPU, for inference.

PyTorch's CPU `nn.Linear` calls the BLAS its wheel links (MKL on x86). On the development
machine's AMD EPYC that ran fc6 + fc7 of 2000 regions (ZF-5, 12800 -> 4096 -> 4096) at 142-153
GFLOP/s, while oneDNN's inner product, which PyTorch ships too, ran the same product at 186-196
GFLOP/s with results equal up to fp32 rounding (max difference 1e-6 on outputs of about 1).
`linear` takes that route where it applies: CPU, fp32, no autograd, no autocast (the bf16
variant keeps its own kernels), a plain `nn.Linear` (not the int8 or SVD replacements). The
weights are converted to oneDNN's format once and again only after they change.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

# layer -> ((weight version, bias version, weight address), weight, bias in oneDNN's format);
# weak, so that the cache never keeps a net alive nor travels with a copied one
_PACKED: "weakref.WeakKeyDictionary[nn.Linear, tuple]" = weakref.WeakKeyDictionary()
_enabled = True


@contextmanager
def off() -> Iterator[None]:
    """`linear` as plain `nn.Linear` inside the block (torch's FLOP counter does not know
    oneDNN's op; tests compare the two)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


def applies(layer: nn.Module, x: Tensor) -> bool:
    """Whether `layer(x)` can run through oneDNN here with the same numbers up to rounding."""
    return (_enabled and type(layer) is nn.Linear and layer.bias is not None
            and x.device.type == "cpu" and x.dtype == torch.float32
            and layer.weight.dtype == torch.float32 and x.dim() == 2 and x.shape[0] > 0
            and x.shape[1] == layer.in_features  # else nn.Linear's own clear shape error
            and not torch.is_grad_enabled() and not _cpu_autocast()
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:           # torch < 2.4 names it apart
        return torch.is_autocast_cpu_enabled()


def _packed(layer: nn.Linear) -> tuple[Tensor, Tensor] | None:
    weight, bias = layer.weight, layer.bias
    try:
        key = (weight._version, bias._version, weight.data_ptr())
    except RuntimeError:        # inference tensors keep no version: do not cache
        return None
    entry = _PACKED.get(layer)
    if entry is None or entry[0] != key:
        entry = (key, weight.detach().to_mkldnn(), bias.detach().to_mkldnn())
        _PACKED[layer] = entry
    return entry[1], entry[2]


def linear(layer: nn.Module, x: Tensor) -> Tensor:
    """`layer(x)`, through oneDNN where `applies` says so."""
    if not applies(layer, x):
        return layer(x)
    packed = _packed(layer)
    if packed is None:
        return layer(x)
    weight, bias = packed
    return torch.ops.aten.mkldnn_linear(x.contiguous().to_mkldnn(), weight, bias).to_dense()
