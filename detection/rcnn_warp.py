"""R-CNN's region warp: each box grown by `context` pixels at the crop scale (16 of 227 in the
paper; for another crop size the same fraction, 16/227 of the crop, by default), warped
anisotropically to `crop x crop`, with the mean pixel (zero after preprocessing) outside the
image; batched on the device with `torchvision.ops.roi_align` (bilinear, averaging as many
samples per output pixel as the shrink needs: an antialiased resize). Its cost is the product of
the samples on both axes, ceil(shrink) each, so a region shrunk 2^k times or more on both axes
is read from the image averaged over 2^k x 2^k blocks (a pyramid of 2x2 means), where
roi_align takes at most 2 samples along the less shrunk axis (a 3x shrink took 9 samples per
pixel, now 4 on the half-size image). On a CPU the boxes are split over torch's intra-op
threads: torchvision's CPU kernel keeps to about one core."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import roi_align

RCNN_CONTEXT = 16
RCNN_CROP = 227
MIN_BOXES_PER_THREAD = 32       # fewer: one call (a thread hand-off costs more than it saves)


def default_context(crop: int) -> float:
    """R-CNN's 16 px of context at 227, as the same fraction of another crop size."""
    return RCNN_CONTEXT * crop / RCNN_CROP


def context_boxes(boxes: Tensor, crop: int, context: float | None = None) -> Tensor:
    """Continuous regions `[N, 4]` (pixel edges) to warp: each 0-based inclusive box grown so that
    after warping to `crop` the box itself fills the middle `crop - 2*context` pixels."""
    context = default_context(crop) if context is None else context
    b = boxes.to(torch.float32)
    size = (b[:, 2:] - b[:, :2] + 1).clamp(min=1)           # pixels, as the devkit counts them
    pad = size * (context / (crop - 2 * context))
    return torch.cat([b[:, :2] - pad, b[:, 2:] + 1 + pad], dim=1)


def pyramid_levels(regions: Tensor, crop: int) -> Tensor:
    """The pyramid level `k` (image averaged over 2^k x 2^k blocks) each region `[N, 4]` is warped
    from: the largest with the region at least `crop` pixels on both axes there."""
    shrink = ((regions[:, 2:] - regions[:, :2]).min(dim=1).values / crop).clamp(min=1)
    return torch.floor(torch.log2(shrink)).to(torch.int64)


def warp_regions(image: Tensor, boxes: Tensor, crop: int, context: float | None = None) -> Tensor:
    """Warp every box of a preprocessed `[1, 3, H, W]` image to `[N, 3, crop, crop]`."""
    return warp_images([(image, boxes)], crop, context)


def warp_images(pairs: Sequence[tuple[Tensor, Tensor]], crop: int,
                context: float | None = None) -> Tensor:
    """`warp_regions` of several `(image, boxes)` pairs, concatenated in order. On a CPU the
    work (the boxes of each image and pyramid level, in parts) is spread over torch's threads."""
    if not pairs:
        raise ValueError("warp_images needs at least one (image, boxes) pair")
    threads = torch.get_num_threads()
    tasks, places, count = _warp_tasks(pairs, crop, context, threads)
    if not tasks:
        image = pairs[0][0]
        return image.new_zeros((0, image.shape[1], crop, crop))
    on_cpu = all(image.device.type == "cpu" for image, _ in pairs)
    if threads < 2 or len(tasks) < 2 or not on_cpu:
        warps = [_warp(image, rois, crop) for image, rois in tasks]
    else:
        # roi_align releases the GIL, so the threads run on separate cores. They end with the
        # call: a pool kept alive made SPP-net's pooling, timed later in the same process,
        # about twice as slow (demo bench: 0.02 -> 0.04 s per image); thread start-up is
        # negligible against a warp. 440 boxes of a demo image to 99 px on this project's
        # 2-core CPU: 206 -> 143 ms.
        with ThreadPoolExecutor(threads, thread_name_prefix="warp") as pool:
            warps = list(pool.map(lambda t: _warp(t[0], t[1], crop), tasks))
    if len(warps) == 1:
        return warps[0]
    out = warps[0].new_empty((count, *warps[0].shape[1:]))
    for place, warp in zip(places, warps):
        out[place] = warp
    return out


def _warp_tasks(pairs: Sequence[tuple[Tensor, Tensor]], crop: int, context: float | None,
                threads: int) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor], int]:
    """The roi_align calls of `warp_images`: `(level image, rois)` per image, pyramid level and
    part (a CPU's boxes split over `threads`), the output rows of each, and the rows in all."""
    tasks, places, count = [], [], 0
    for image, boxes in pairs:
        regions = context_boxes(boxes.to(image.device), crop, context)
        levels = pyramid_levels(regions, crop)
        level_image = image
        for level in range(int(levels.max()) + 1 if len(levels) else 0):
            if level:
                level_image = F.avg_pool2d(level_image, 2, ceil_mode=True)
            at = torch.nonzero(levels == level).flatten()
            if len(at) == 0:
                continue
            rois = torch.cat([regions.new_zeros(len(at), 1), regions[at] / 2 ** level], dim=1)
            parts = min(threads, len(rois) // MIN_BOXES_PER_THREAD) \
                if image.device.type == "cpu" else 1
            for part in torch.tensor_split(torch.arange(len(at)), max(1, parts)):
                tasks.append((level_image, rois[part.to(rois.device)].to(image.dtype)))
                places.append(count + at[part.to(at.device)])
        count += len(regions)
    return tasks, places, count


def _warp(image: Tensor, rois: Tensor, crop: int) -> Tensor:
    return roi_align(image, rois, output_size=(crop, crop), spatial_scale=1.0,
                     sampling_ratio=-1, aligned=True)
