"""Region features for both methods through one API: `extract(net, image, boxes, method)`.

- SPP-net: the conv layers run ONCE per image and scale; every box is projected onto the conv5 map
  of its scale and pyramid-pooled, then fc6/fc7 run on all pooled windows in batches.
- R-CNN: every box is grown by 16 px of context, warped to the crop size on the device, and the
  warps go through conv1-5, pool5, fc6 and fc7 in chunks (which bound memory).

Switches beyond the paper (off by default, `ExtractSettings`): `dedup` pools and runs fc6/fc7 once
per distinct conv5 window when several boxes project onto the same cells (exact: the features are
the same); `channels_last` runs the conv layers in NHWC memory layout; `precision` 'bf16' or
'fp16' runs conv and fc under autocast (fc7 is returned as fp32). Truncated SVD of fc6/fc7 is a
change of the net (`detection.speedups`).

Timing hooks (a `StageTimer`) split the work as the paper's table does: `conv` (SPP: resizing and
the conv layers over the whole image at every scale; R-CNN: warping and the conv layers over all
regions, pool5 included), `pool` (SPP's pyramid pooling of all windows) and `fc` (fc6 + fc7 over
all windows). The device is synchronised around each stage.
"""

from __future__ import annotations

import contextlib
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
    dedup: bool = False
    channels_last: bool = False
    batch_images: int = 1             # images per trunk call in `extract_batch`
    precision: str = "fp32"           # fp32, bf16 or fp16 (autocast)


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
              max_side: int = DEFAULT_MAX_SIDE, channels_last: bool = False) -> ConvMaps:
    """Run the trunk once per scale on the whole image (HxWx3 uint8 RGB)."""
    pre = net.preprocess(image)
    height, width = pre.shape[-2:]
    factors = [scale_factor(height, width, s, max_side) for s in scales]
    maps = [net.trunk(resize_image(pre, f).contiguous(memory_format=_layout(channels_last)))[0]
            for f in factors]
    return ConvMaps(factors, maps)


def conv_maps_batch(net: DetectorNet, images: Sequence[np.ndarray | Tensor],
                    scales: Sequence[int], max_side: int = DEFAULT_MAX_SIDE,
                    channels_last: bool = False) -> list[ConvMaps]:
    """`conv_maps` of several images with one trunk call per scale: the resized images are
    padded at the right and bottom with zeros (the mean pixel) to a common size, and each map is
    cut back to its own image's size. A padded image's cells whose receptive field reaches into
    the padding differ from `conv_maps` (with the trunk's large receptive fields, often half the
    map), so `extract_batch` groups images of the same scaled size; the mAP cost is measured."""
    from detection.backbones import output_side

    pres = [net.preprocess(image) for image in images]
    factors = [[scale_factor(*pre.shape[-2:], s, max_side) for s in scales] for pre in pres]
    maps: list[list[Tensor]] = [[] for _ in pres]
    for k in range(len(scales)):
        resized = [resize_image(pre, f[k]) for pre, f in zip(pres, factors)]
        height = max(r.shape[-2] for r in resized)
        width = max(r.shape[-1] for r in resized)
        batch = resized[0].new_zeros((len(resized), 3, height, width))
        for i, r in enumerate(resized):
            batch[i, :, :r.shape[-2], :r.shape[-1]] = r[0]
        out = net.trunk(batch.contiguous(memory_format=_layout(channels_last)))
        for i, r in enumerate(resized):
            h, w = output_side(net.trunk, r.shape[-2]), output_side(net.trunk, r.shape[-1])
            maps[i].append(out[i, :, :h, :w])
    return [ConvMaps(f, m) for f, m in zip(factors, maps)]


def box_windows(net: DetectorNet, conv: ConvMaps, boxes: Tensor,
                box_target: float = 224.0) -> Tensor:
    """Each box's scale and conv5 window: int64 `[N, 5]` rows `(scale index, x1, y1, x2, y2)`,
    the box pooled at the scale where its area is closest to `box_target` squared."""
    boxes = boxes.to(conv.maps[0].device)
    if not boxes.is_floating_point():        # integer pixels: scale them in float
        boxes = boxes.float()
    scale_of_box = assign_scales(boxes, conv.factors, box_target)
    # every box projected in one call, each with its own scale's factor and map size
    factors = torch.tensor(conv.factors, dtype=boxes.dtype, device=boxes.device)
    sizes = torch.tensor([fmap.shape[1:] for fmap in conv.maps], device=boxes.device)
    per_box = sizes[scale_of_box]
    cells = project_boxes(boxes * factors[scale_of_box][:, None], net.stride, net.first_centre,
                          per_box[:, 0], per_box[:, 1])
    return torch.cat([scale_of_box[:, None], cells], 1)


def conv_maps_for_boxes(net: DetectorNet, image: np.ndarray | Tensor, boxes: Tensor,
                        scales: Sequence[int], max_side: int = DEFAULT_MAX_SIDE,
                        box_target: float = 224.0) -> tuple[ConvMaps, Tensor]:
    """The conv5 maps of `image` at only those of `scales` that some box is pooled at (each box
    where its area is closest to `box_target` squared, as `box_windows` chooses among all of
    them), and each box's window `[N, 5]` among those maps. Autograd flows when enabled: SPP-net's
    fine-tuning of the conv layers runs a few hundred boxes of an image through the trunk this
    way, without the scales none of them needs."""
    pre = net.preprocess(image)
    height, width = pre.shape[-2:]
    boxes = boxes.to(pre.device).float()
    factors = [scale_factor(height, width, s, max_side) for s in scales]
    used = assign_scales(boxes, factors, box_target).unique().tolist()
    conv = ConvMaps([factors[k] for k in used],
                    [net.trunk(resize_image(pre, factors[k]))[0] for k in used])
    # each box's best scale is among `used`, so choosing among these alone picks it again
    return conv, box_windows(net, conv, boxes, box_target)


def pool_scaled_windows(net: DetectorNet, conv: ConvMaps, windows: Tensor,
                        pool_chunk: int = 128) -> Tensor:
    """Pyramid-pool windows `[N, 5]` as `box_windows` gives them: `[N, C * sum(n*n)]`."""
    out = conv.maps[0].new_empty((len(windows), net.spp.output_size(conv.maps[0].shape[0])))
    for k, fmap in enumerate(conv.maps):
        rows = torch.nonzero(windows[:, 0] == k).flatten()
        if len(rows):
            out[rows] = spp_pool(fmap, windows[rows, 1:], net.spp_levels, pool_chunk)
    return out


def pool_windows(net: DetectorNet, conv: ConvMaps, boxes: Tensor, pool_chunk: int = 128,
                 box_target: float = 224.0) -> Tensor:
    """Pyramid-pool every box (0-based pixels of the original image) at its best scale (the one
    where its area is closest to `box_target` squared): `[N, C * sum(n*n)]`."""
    return pool_scaled_windows(net, conv, box_windows(net, conv, boxes, box_target), pool_chunk)


def rcnn_pool5(net: DetectorNet, image: np.ndarray | Tensor, boxes: Tensor, crop: int,
               context: float | None = None, chunk: int = 128,
               channels_last: bool = False) -> Tensor:
    """Warp every box and run conv1-5 + pool5 on the warps in chunks: `[N, C * g * g]`."""
    pre = net.preprocess(image)
    boxes = boxes.to(pre.device)
    layout = _layout(channels_last)
    parts = [net.pool5(net.trunk(warp_regions(pre, boxes[i:i + chunk], crop, context)
                                 .contiguous(memory_format=layout))).flatten(1)
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
    with torch.inference_mode(), _autocast(device, settings.precision):
        if method == "spp":
            with timer.stage("conv"):
                conv = conv_maps(net, image, settings.scales, settings.max_side,
                                 settings.channels_last)
            return spp_from_maps(net, conv, boxes, settings, timer, return_pooled)
        crop = net.crop_size
        chunk = settings.rcnn_chunk or net.spec.rcnn_chunk
        with timer.stage("conv"):
            pooled = rcnn_pool5(net, image, boxes, crop, settings.context, chunk,
                                settings.channels_last)
        with timer.stage("fc"):
            fc7 = fc_features(net.rcnn_fc, pooled, settings.fc_chunk).float()
    return (pooled.float(), fc7) if return_pooled else fc7


def extract_batch(net: DetectorNet, images: Sequence[np.ndarray | Tensor],
                  boxes: Sequence[Tensor | np.ndarray],
                  settings: ExtractSettings = ExtractSettings(),
                  timer: StageTimer | None = None, return_pooled: bool = False) -> list:
    """SPP-net `extract` of several images, their conv layers run together (`conv_maps_batch`)
    in groups of `settings.batch_images` images of similar size (sorted by their scaled height
    and width, so that little padding is needed); one result per image, in the given order, as
    `extract` gives it."""
    timer = timer or NullTimer()
    device = net_device(net)
    group = max(1, settings.batch_images)

    def resized(i: int) -> tuple[int, int]:          # the image's size at the first scale
        height, width = images[i].shape[:2]
        f = scale_factor(height, width, settings.scales[0], settings.max_side)
        return round(height * f), round(width * f)

    order = sorted(range(len(images)), key=resized)
    out: list = [None] * len(images)
    with torch.inference_mode(), _autocast(device, settings.precision):
        for start in range(0, len(order), group):
            members = order[start:start + group]
            with timer.stage("conv"):
                maps = conv_maps_batch(net, [images[i] for i in members], settings.scales,
                                       settings.max_side, settings.channels_last)
            for i, conv in zip(members, maps):
                out[i] = spp_from_maps(net, conv, _as_boxes(boxes[i], device), settings,
                                       timer, return_pooled)
    return out


def spp_from_maps(net: DetectorNet, conv: ConvMaps, boxes: Tensor, settings: ExtractSettings,
                  timer: StageTimer | None = None, return_pooled: bool = False
                  ) -> Tensor | tuple[Tensor, Tensor]:
    """SPP-net after the conv layers, on maps computed earlier (`conv_maps` at the settings'
    scales): project, pyramid-pool (once per distinct window with `dedup`), fc6/fc7.
    `extract` is this after `conv_maps`; maps shared by several settings give each the numbers
    that `extract` would."""
    timer = timer or NullTimer()
    inverse = None
    with torch.inference_mode(), _autocast(net_device(net), settings.precision):
        with timer.stage("pool"):
            windows = box_windows(net, conv, boxes, settings.box_target)
            if settings.dedup:
                windows, inverse = torch.unique(windows, dim=0, return_inverse=True)
            pooled = pool_scaled_windows(net, conv, windows, settings.pool_chunk)
        with timer.stage("fc"):
            fc7 = fc_features(net.spp_fc, pooled, settings.fc_chunk).float()
            if inverse is not None:
                fc7 = fc7[inverse]
    if not return_pooled:
        return fc7
    return (pooled if inverse is None else pooled[inverse]).float(), fc7


def _layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _autocast(device: torch.device, precision: str):
    """Autocast context for 'bf16'/'fp16', a no-op context for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"unknown precision {precision!r}, expected fp32, bf16 or fp16")
    return torch.autocast(device.type, dtype=dtypes[precision])
