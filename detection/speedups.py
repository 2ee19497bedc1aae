"""SPP-net speedups beyond the paper, each a switch that `sppnet bench` measures for time and
for mAP.

- `dedup`: each distinct conv5 window is pooled and run through fc6/fc7 once (exact).
- `svd`: fc6 and fc7 replaced by truncated SVDs, `W ~ U_r S_r V_r^T` as two thinner layers
  (Fast R-CNN, section 3.1); ranks default to a quarter and a half of the fc width, which
  truncates fc6 only (1024 of 4096 in the paper's ZF-5).
- `channels_last`: conv layers in NHWC memory layout.
- `bf16`, `fp16`: conv and fc under autocast.
- `int8`: fc6/fc7 as dynamically quantised int8 layers (CPU only, PyTorch's fbgemm/x86 kernels).
- `batch`: the conv layers of `BATCH_IMAGES` images in one call (padded to a common size).

A variant is a `+`-joined list of switches, e.g. `dedup+svd+bf16`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from data.errors import SppnetError
from detection.backbones import DetectorNet, FCHead
from detection.features import ExtractSettings

SWITCHES = ("dedup", "svd", "channels_last", "bf16", "fp16", "int8", "batch")
BATCH_IMAGES = 4
PRECISIONS = ("bf16", "fp16", "int8")


def low_rank_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """`layer` as two layers through `rank` dimensions: the best rank-`rank` approximation of its
    weight (truncated SVD), the bias kept on the second layer."""
    weight = layer.weight.detach().to(torch.float64)
    rank = max(1, min(rank, *weight.shape))
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(s[:rank, None] * vh[:rank])
        second.weight.copy_(u[:, :rank])
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second).to(layer.weight.device, layer.weight.dtype)


def default_svd_ranks(hidden: int) -> tuple[int, int]:
    """fc6 and fc7 ranks: a quarter and a half of the fc width. On the demo set, ranks of a
    quarter and an eighth lost 0.6 points of mAP and a quarter and a half 0.08; at a half,
    fc7's factors cost as much as fc7 itself, so it is kept (`truncated_head`)."""
    return max(1, hidden // 4), max(1, hidden // 2)


def truncated_head(head: FCHead, ranks: tuple[int, int]) -> FCHead:
    """A copy of an fc6/fc7 head with each layer replaced by its truncated SVD where the two
    factors are smaller than the layer (`rank * (in + out) < in * out`)."""
    out = copy.deepcopy(head)
    for name, rank in zip(("fc6", "fc7"), ranks):
        layer = getattr(head, name)
        if rank * (layer.in_features + layer.out_features) < layer.in_features * layer.out_features:
            setattr(out, name, low_rank_linear(layer, rank))
    return out


def int8_available(device: torch.device) -> bool:
    """Whether `int8` can run: a CPU with one of PyTorch's quantised engines."""
    engines = set(torch.backends.quantized.supported_engines)
    return device.type == "cpu" and bool(engines & {"fbgemm", "x86", "qnnpack"})


def quantized_head(head: nn.Module) -> nn.Module:
    """A copy of an fc head whose linear layers run in int8 with weights quantised per output
    channel and activations quantised on the fly (CPU only). Per-tensor weights lost 0.6
    points of mAP on the demo set together with `svd`."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if next(head.parameters()).device.type != "cpu":
        raise SppnetError("the int8 speedup runs on a CPU only")
    with warnings.catch_warnings():       # torch.ao.quantization points users to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(head), {nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)


def parse_variant(name: str) -> tuple[str, ...]:
    """The switches of a variant name such as `dedup+svd+bf16`; an unknown one is an error."""
    switches = tuple(part for part in name.split("+") if part)
    unknown = [s for s in switches if s not in SWITCHES]
    if not switches or unknown:
        raise SppnetError(f"unknown speedup {'+'.join(unknown) or name!r}; "
                          f"choose from {', '.join(SWITCHES)} joined by '+'")
    if sum(s in PRECISIONS for s in switches) > 1:
        raise SppnetError(f"speedup {name!r} names more than one precision")
    return switches


def apply_variant(net: DetectorNet, settings: ExtractSettings, switches: Sequence[str],
                  svd_ranks: tuple[int, int] | None = None
                  ) -> tuple[DetectorNet, ExtractSettings]:
    """The net and settings with the switches on. The given net is not changed: `svd` and
    `channels_last` work on a copy."""
    if {"svd", "channels_last", "int8"} & set(switches):
        net = copy.deepcopy(net)
    if "svd" in switches:
        net.spp_fc = truncated_head(net.spp_fc, svd_ranks or default_svd_ranks(net.feature_dim))
    if "channels_last" in switches:
        net.trunk = net.trunk.to(memory_format=torch.channels_last)
    if "int8" in switches:
        net.spp_fc = quantized_head(net.spp_fc)
    precision = next((s for s in switches if s in ("bf16", "fp16")), "fp32")
    return net, replace(settings, dedup="dedup" in switches,
                        channels_last="channels_last" in switches, precision=precision,
                        batch_images=BATCH_IMAGES if "batch" in switches else 1)


def variant_detector(detector, switches: Sequence[str]):
    """A copy of a trained `Detector` with the switches on (its SPP-net fc6/fc7 truncated for
    `svd`); the given detector is not changed."""
    net, settings = apply_variant(detector.net, detector.settings, switches)
    speedups = {"dedup": settings.dedup, "channels_last": settings.channels_last,
                "precision": settings.precision, "batch_images": settings.batch_images}
    return replace(detector, net=net, speedups=speedups)

