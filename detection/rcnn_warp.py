"""R-CNN's region warp: each box grown by `context` pixels at the crop scale (16 of 227 in the
paper; for another crop size the same fraction, 16/227 of the crop, by default), warped anisotropically to `crop x crop`, with the mean pixel (zero after preprocessing)
outside the image; batched on the device with `torchvision.ops.roi_align` (bilinear, with as many
samples per output pixel as needed when shrinking: an antialiased resize)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align

RCNN_CONTEXT = 16
RCNN_CROP = 227


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
    regions = context_boxes(boxes.to(image.device), crop, context)
    rois = torch.cat([regions.new_zeros(len(regions), 1), regions], dim=1).to(image.dtype)
    return roi_align(image, rois, output_size=(crop, crop), spatial_scale=1.0,
                     sampling_ratio=-1, aligned=True)
