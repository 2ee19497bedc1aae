"""Region features for both methods through one API: `extract(net, image, boxes, method)`.

- SPP-net: the conv layers run ONCE per image and scale; every box is projected onto the conv5 map
  of its scale and pyramid-pooled, then fc6/fc7 run on all pooled windows in batches.
- R-CNN: every box is grown by 16 px of context, warped to the crop size on the device, and the
  warps go through conv1-5, pool5, fc6 and fc7 in chunks (which bound memory).

Timing hooks (a `StageTimer`) split the work as the paper's table does: `conv` (SPP: resizing and
the conv layers over the whole image at every scale; R-CNN: warping and the conv layers over all
regions, pool5 included), `pool` (SPP's pyramid pooling of all windows) and `fc` (fc6 + fc7 over
all windows). The device is synchronised around each stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from detection.backbones import DetectorNet
from detection.rcnn_warp import warp_regions
from detection.scales import DEFAULT_MAX_SIDE, SINGLE_SCALE, assign_scales, resize_image, scale_factor
from detection.spp import project_boxes, spp_pool
from detection.timing import NullTimer, StageTimer

METHODS = ("spp", "rcnn")


@dataclass(frozen=True)
class ExtractSettings:
    """How features are computed. `rcnn_chunk` defaults to the backbone's own; the R-CNN crop
    size belongs to the net (its fc6 depends on it)."""

    scales: tuple[int, ...] = (SINGLE_SCALE,)
    max_side: int = DEFAULT_MAX_SIDE
    context: float | None = None      # R-CNN context pixels at the crop size (None: 16/227)
    box_target: float = 224.0         # multi-scale: each box pooled where its side is closest
    rcnn_chunk: int | None = None
    pool_chunk: int = 128
    fc_chunk: int = 1024


@dataclass
class ConvMaps:
    """The conv5 maps of one image: `maps[k]` is `[C, h, w]` at `factors[k]` times the size."""

    factors: list[float]
    maps: list[Tensor]


def net_device(net: torch.nn.Module) -> torch.device:
    """The device that holds the net's parameters."""
    return next(net.parameters()).device


def _as_boxes(boxes: Tensor | np.ndarray, device: torch.device) -> Tensor:
    return torch.as_tensor(np.asarray(boxes) if not isinstance(boxes, Tensor) else boxes,
                           dtype=torch.float32).reshape(-1, 4).to(device)


def conv_maps(net: DetectorNet, image: np.ndarray | Tensor, scales: Sequence[int],
              max_side: int = DEFAULT_MAX_SIDE) -> ConvMaps:
    """Run the trunk once per scale on the whole image (HxWx3 uint8 RGB)."""
    pre = net.preprocess(image)
    height, width = pre.shape[-2:]
    factors = [scale_factor(height, width, s, max_side) for s in scales]
    maps = [net.trunk(resize_image(pre, f))[0] for f in factors]
    return ConvMaps(factors, maps)


def pool_windows(net: DetectorNet, conv: ConvMaps, boxes: Tensor, pool_chunk: int = 128,
                 box_target: float = 224.0) -> Tensor:
    """Pyramid-pool every box (0-based pixels of the original image) at its best scale (the one
    where its area is closest to `box_target` squared): `[N, C * sum(n*n)]`."""
    device = conv.maps[0].device
    boxes = boxes.to(device)
    scale_of_box = assign_scales(boxes, conv.factors, box_target)
    out = conv.maps[0].new_empty((len(boxes), net.spp.output_size(conv.maps[0].shape[0])))
    for k, (factor, fmap) in enumerate(zip(conv.factors, conv.maps)):
        rows = torch.nonzero(scale_of_box == k).flatten()
        if len(rows) == 0:
            continue
        windows = project_boxes(boxes[rows] * factor, net.stride, net.first_centre,
                                fmap.shape[1], fmap.shape[2])
        out[rows] = spp_pool(fmap, windows, net.spp_levels, pool_chunk)
    return out


def rcnn_pool5(net: DetectorNet, image: np.ndarray | Tensor, boxes: Tensor, crop: int,
               context: float | None = None, chunk: int = 128) -> Tensor:
    """Warp every box and run conv1-5 + pool5 on the warps in chunks: `[N, C * g * g]`."""
    pre = net.preprocess(image)
    boxes = boxes.to(pre.device)
    parts = [net.pool5(net.trunk(warp_regions(pre, boxes[i:i + chunk], crop, context))).flatten(1)
             for i in range(0, len(boxes), chunk)]
    if not parts:
        g = net.pool5_grid
        return pre.new_zeros((0, net.spec.channels * g * g))
    return torch.cat(parts)


def fc_features(head: torch.nn.Module, pooled: Tensor, chunk: int = 1024) -> Tensor:
    """fc6 + fc7 over pooled windows in batches of `chunk`: `[N, hidden]`."""
    if len(pooled) <= chunk:
        return head(pooled)
    return torch.cat([head(pooled[i:i + chunk]) for i in range(0, len(pooled), chunk)])


def extract(net: DetectorNet, image: np.ndarray | Tensor, boxes: Tensor | np.ndarray,
            method: str, settings: ExtractSettings = ExtractSettings(),
            timer: StageTimer | None = None, return_pooled: bool = False
            ) -> Tensor | tuple[Tensor, Tensor]:
    """fc7 features `[N, hidden]` of `boxes` `[N, 4]` (0-based xyxy pixels of `image`, an HxWx3
    uint8 RGB array or tensor) by `method` ('spp' or 'rcnn'), in inference mode on the net's
    device. Stage times go to `timer` if given. With `return_pooled`, also the pooled conv
    features the fc layers read (SPP pyramid or R-CNN pool5): `(pooled, fc7)`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}, expected one of {METHODS}")
    timer = timer or NullTimer()
    device = net_device(net)
    boxes = _as_boxes(boxes, device)
    with torch.inference_mode():
        if method == "spp":
            with timer.stage("conv"):
                conv = conv_maps(net, image, settings.scales, settings.max_side)
            with timer.stage("pool"):
                pooled = pool_windows(net, conv, boxes, settings.pool_chunk,
                                      settings.box_target)
            head = net.spp_fc
        else:
            crop = net.crop_size
            chunk = settings.rcnn_chunk or net.spec.rcnn_chunk
            with timer.stage("conv"):
                pooled = rcnn_pool5(net, image, boxes, crop, settings.context, chunk)
            head = net.rcnn_fc
        with timer.stage("fc"):
            fc7 = fc_features(head, pooled, settings.fc_chunk)
    return (pooled, fc7) if return_pooled else fc7
