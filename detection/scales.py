"""Image scales: the shorter side to `s` with a cap on the longer side, and, for multi-scale
SPP-net, the choice of one scale per box (the one where the box is closest to 224 x 224)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

PAPER_SCALES: tuple[int, ...] = (480, 576, 688, 864, 1200)
SINGLE_SCALE = 688
DEFAULT_MAX_SIDE = 2000
TARGET_BOX_SIDE = 224.0


def box_target_side(crop_size: int) -> float:
    """Side (px) at which multi-scale SPP-net pools a box: 224 for a trunk trained on 227-pixel
    inputs (the paper's ZF-5), the same fraction of the input for other trunks."""
    return TARGET_BOX_SIDE * crop_size / 227.0


def scale_factor(height: int, width: int, shorter: int, max_side: int = DEFAULT_MAX_SIDE) -> float:
    """Factor that takes the shorter side to `shorter`, reduced if the longer side would pass
    `max_side`."""
    factor = shorter / min(height, width)
    if factor * max(height, width) > max_side:
        factor = max_side / max(height, width)
    return factor


def fit_input(pixels: np.ndarray, shorter: int, longer: int
              ) -> tuple[np.ndarray, tuple[float, float]]:
    """`pixels` (HxWx3 uint8) shrunk (area interpolation) where they exceed the largest input
    a stage takes, a shorter side of `shorter` with the longer side at most `longer` (the rule
    of `scale_factor`), and the factors (across, down) that took them there; as they are, with
    (1, 1), otherwise."""
    import cv2

    height, width = pixels.shape[:2]
    factor = scale_factor(height, width, shorter, longer)
    if factor >= 1.0:
        return pixels, (1.0, 1.0)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    small = np.ascontiguousarray(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA))
    return small, (size[0] / width, size[1] / height)


def resize_image(image: Tensor, factor: float) -> Tensor:
    """Resize a `[1, 3, H, W]` float image by `factor` (bilinear, antialiased when shrinking)."""
    if factor == 1.0:
        return image
    height, width = image.shape[-2:]
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False,
                         antialias=factor < 1.0)


def assign_scales(boxes: Tensor, factors: Sequence[float],
                  target: float = TARGET_BOX_SIDE) -> Tensor:
    """For each box `[N, 4]` (0-based pixels of the original image), the index of the scale
    where its area is closest to `target**2` (the original code's rule). `[N]` int64."""
    if len(factors) == 1:
        return torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
    wh = (boxes[:, 2:] - boxes[:, :2] + 1).clamp(min=1).to(torch.float64)
    area = wh[:, 0] * wh[:, 1]
    f = torch.as_tensor(list(factors), dtype=torch.float64, device=boxes.device)
    return (area[:, None] * f[None] ** 2 - target ** 2).abs().argmin(dim=1)
