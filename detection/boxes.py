"""Box operations in the program's convention: 0-based pixel-inclusive float `(x1, y1, x2, y2)`,
so a box is `x2 - x1 + 1` pixels wide (the VOC devkit's and R-CNN's convention).

IoU comes from `torchvision.ops.box_iou` on boxes widened by one pixel; the regression targets are
R-CNN's `(dx, dy, log dw, log dh)` relative to the proposal's centre and size.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

_WIDEN = (0.0, 0.0, 1.0, 1.0)


def pixel_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU `[N, M]` of pixel-inclusive boxes (areas with +1)."""
    widen = boxes1.new_tensor(_WIDEN)
    return box_iou(boxes1 + widen, boxes2.to(boxes1) + widen)


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = boxes[..., 2] - boxes[..., 0] + 1
    h = boxes[..., 3] - boxes[..., 1] + 1
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def mirror_boxes(boxes: Tensor, width: int) -> Tensor:
    """The boxes `[..., 4]` in the image flipped left to right (`width` pixels wide)."""
    return torch.stack([width - 1 - boxes[..., 2], boxes[..., 1], width - 1 - boxes[..., 0],
                        boxes[..., 3]], dim=-1)


def scale_boxes(boxes: Tensor, sx: float, sy: float) -> Tensor:
    """The boxes `[..., 4]` in the image resized by `sx` across and `sy` down: each pixel span
    `[x1, x2 + 1)` is scaled, so `(x1 sx, y1 sy, (x2 + 1) sx - 1, (y2 + 1) sy - 1)`; the factors
    `1 / sx`, `1 / sy` take them back. Factors of 1 give the boxes themselves."""
    if sx == 1.0 and sy == 1.0:
        return boxes
    widen = boxes.new_tensor(_WIDEN)
    return (boxes + widen) * boxes.new_tensor([sx, sy, sx, sy]) - widen


def clip_boxes(boxes: Tensor, width: int, height: int) -> Tensor:
    """Clip 0-based pixel boxes (any leading shape, last dim 4) to the image."""
    limit = boxes.new_tensor([width - 1, height - 1, width - 1, height - 1])
    return torch.minimum(boxes.clamp(min=0), limit)


def boxes_in_image(boxes: Tensor, width: int, height: int,
                   slack: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Boxes `[N, 4]` against a `width x height` image: the boxes clipped to it, which lie wholly
    outside it, and which reach beyond it by more than `slack` pixels (a tool that writes a box
    at the border as `xmax = width + 1` is forgiven one pixel)."""
    limit = boxes.new_tensor([width - 1, height - 1])
    outside = (boxes[:, :2] > limit).any(1) | (boxes[:, 2:] < 0).any(1)
    reaching = (boxes[:, :2] < -slack).any(1) | (boxes[:, 2:] > limit + slack).any(1)
    return clip_boxes(boxes, width, height), outside, reaching & ~outside


def box_deltas(proposals: Tensor, targets: Tensor) -> Tensor:
    """Regression targets `[N, 4]` that take each proposal to its target box."""
    px, py, pw, ph = _centre_size(proposals)
    gx, gy, gw, gh = _centre_size(targets)
    return torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)],
                       dim=-1)


def apply_deltas(proposals: Tensor, deltas: Tensor) -> Tensor:
    """Inverse of `box_deltas`: boxes `[..., 4]` from proposals `[N, 4]` and deltas `[..., 4]`
    (deltas may carry extra leading dims after N, e.g. `[N, K, 4]` per class)."""
    px, py, pw, ph = _centre_size(proposals)
    extra = deltas.dim() - proposals.dim()
    px, py, pw, ph = (t.reshape(t.shape + (1,) * extra) for t in (px, py, pw, ph))
    cx = px + deltas[..., 0] * pw
    cy = py + deltas[..., 1] * ph
    w = pw * torch.exp(deltas[..., 2].clamp(max=4.0))
    h = ph * torch.exp(deltas[..., 3].clamp(max=4.0))
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - 1, cy + 0.5 * h - 1], dim=-1)
