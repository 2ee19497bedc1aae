"""Training regions of one image: its proposals (and ground-truth boxes) labelled by overlap, and
the fixed-fraction foreground/background sampling of fine-tuning minibatches.

Difficult objects are left out of training, as in R-CNN's and Fast R-CNN's VOC setup.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from data.voc import VOCImage
from detection.boxes import pixel_iou

FG_IOU = 0.5
BG_IOU = (0.1, 0.5)


@dataclass
class LabelledRegions:
    """Rows of one image: `boxes [N, 4]`, `gt_class [N]` (class 1..K for ground-truth rows, 0 for
    proposals), `max_iou [N, K]` (best IoU with a box of each class), `label [N]` (class of the
    best-overlapping box when its IoU >= 0.5, else 0), `best_iou [N]` and `target [N, 4]` (that
    box)."""

    boxes: Tensor
    gt_class: Tensor
    max_iou: Tensor
    label: Tensor
    best_iou: Tensor
    target: Tensor

    def __len__(self) -> int:
        return len(self.boxes)


def training_objects(image: VOCImage, classes: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """Non-difficult ground truth of an image: boxes `[G, 4]` and labels `[G]` (1..K)."""
    keep = ~image.difficult()
    boxes = torch.as_tensor(image.boxes()[keep], dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(image.labels(classes)[keep], dtype=torch.int64)
    return boxes, labels


def label_regions(proposals: Tensor | np.ndarray, gt_boxes: Tensor, gt_labels: Tensor,
                  num_classes: int, include_gt: bool = True, fg_iou: float = FG_IOU
                  ) -> LabelledRegions:
    """Label `proposals` (and, first, the ground-truth rows when `include_gt`) by their overlap
    with the ground truth."""
    props = torch.as_tensor(proposals, dtype=torch.float32).reshape(-1, 4)
    boxes = torch.cat([gt_boxes, props]) if include_gt else props
    gt_class = torch.zeros(len(boxes), dtype=torch.int64)
    if include_gt:
        gt_class[:len(gt_boxes)] = gt_labels
    max_iou = torch.zeros(len(boxes), num_classes)
    best_iou = torch.zeros(len(boxes))
    label = torch.zeros(len(boxes), dtype=torch.int64)
    target = boxes.clone()
    if len(gt_boxes):
        iou = pixel_iou(boxes, gt_boxes)                                  # [N, G]
        per_class = torch.zeros(len(boxes), num_classes + 1)
        per_class.scatter_reduce_(1, gt_labels[None].expand(len(boxes), -1), iou, "amax")
        max_iou = per_class[:, 1:]
        best_iou, best = iou.max(dim=1)
        label = torch.where(best_iou >= fg_iou, gt_labels[best], 0)
        target = gt_boxes[best]
    return LabelledRegions(boxes, gt_class, max_iou, label, best_iou, target)


def sample_rows(regions: LabelledRegions, count: int, fg_fraction: float,
                rng: np.random.Generator, bg_range: tuple[float, float] = BG_IOU) -> np.ndarray:
    """Indices of a fine-tuning sample of `count` rows: up to `fg_fraction` foreground
    (IoU >= 0.5), the rest background with best IoU in `bg_range` (any IoU below 0.5 when that
    range is empty for this image); sampled without replacement where possible."""
    fg = np.flatnonzero(regions.label.numpy() > 0)
    best = regions.best_iou.numpy()
    bg = np.flatnonzero((regions.label.numpy() == 0) & (best >= bg_range[0]) & (best < bg_range[1]))
    if len(bg) == 0:
        bg = np.flatnonzero(regions.label.numpy() == 0)
    n_fg = min(len(fg), int(round(count * fg_fraction)))
    picked = [rng.choice(fg, n_fg, replace=False)] if n_fg else []
    n_bg = count - n_fg
    if len(bg) and n_bg:
        picked.append(rng.choice(bg, n_bg, replace=len(bg) < n_bg))
    return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
