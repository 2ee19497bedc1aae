"""R-CNN's region warp: each box grown by `context` pixels at the crop scale (16 of 227 in the
paper; for another crop size the same fraction, 16/227 of the crop, by default), warped
anisotropically to `crop x crop`, with the mean pixel (zero after preprocessing) outside the
image; batched on the device with `torchvision.ops.roi_align` (bilinear, with as many samples per
output pixel as needed when shrinking: an antialiased resize). On a CPU the boxes are split over
torch's intra-op threads: torchvision's CPU kernel keeps to about one core."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch
from torch import Tensor
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


def warp_regions(image: Tensor, boxes: Tensor, crop: int, context: float | None = None) -> Tensor:
    """Warp every box of a preprocessed `[1, 3, H, W]` image to `[N, 3, crop, crop]`."""
    return warp_images([(image, boxes)], crop, context)


def warp_images(pairs: Sequence[tuple[Tensor, Tensor]], crop: int,
                context: float | None = None) -> Tensor:
    """`warp_regions` of several `(image, boxes)` pairs, concatenated in order. On a CPU the
    work (whole images, or parts of an image's boxes) is spread over torch's thread count."""
    if not pairs:
        raise ValueError("warp_images needs at least one (image, boxes) pair")
    threads = torch.get_num_threads()
    tasks = []
    for image, boxes in pairs:
        regions = context_boxes(boxes.to(image.device), crop, context)
        rois = torch.cat([regions.new_zeros(len(regions), 1), regions], dim=1).to(image.dtype)
        parts = min(threads, len(rois) // MIN_BOXES_PER_THREAD) if image.device.type == "cpu" \
            else 1
        tasks.extend((image, r) for r in torch.tensor_split(rois, max(1, parts)))
    on_cpu = all(image.device.type == "cpu" for image, _ in pairs)
    if threads < 2 or len(tasks) < 2 or not on_cpu:
        return torch.cat([_warp(image, rois, crop) for image, rois in tasks])
    # roi_align releases the GIL, so the threads run on separate cores. They end with the call:
    # a pool kept alive made SPP-net's pooling, timed later in the same process, about twice as
    # slow (demo bench: 0.02 -> 0.04 s per image); thread start-up is negligible against a warp.
    # 440 boxes of a demo image to 99 px on this project's 2-core CPU: 206 -> 143 ms.
    with ThreadPoolExecutor(threads, thread_name_prefix="warp") as pool:
        return torch.cat(list(pool.map(lambda t: _warp(t[0], t[1], crop), tasks)))


def _warp(image: Tensor, rois: Tensor, crop: int) -> Tensor:
    return roi_align(image, rois, output_size=(crop, crop), spatial_scale=1.0,
                     sampling_ratio=-1, aligned=True)
