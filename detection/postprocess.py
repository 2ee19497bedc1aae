"""Test-time post-processing: per-class NMS and the per-class cap, from class scores of boxes to
torchvision-style detections `{"boxes": [M, 4], "labels": [M], "scores": [M]}` (label 0 is the
background, so class k of the score matrix is label k + 1)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

NMS_IOU = 0.3
MAX_PER_CLASS = 100


def detections_from_scores(boxes: Tensor, scores: Tensor, score_threshold: float = -float("inf"),
                           nms_iou: float = NMS_IOU, max_per_class: int = MAX_PER_CLASS) -> dict:
    """Per-class NMS of `boxes` scored by `scores`.

    `boxes` is `[N, 4]` (shared by all classes) or `[N, K, 4]` (per class, after box
    regression); `scores` is `[N, K]`. Candidates at or below `score_threshold` are dropped before
    NMS at IoU `nms_iou`; at most `max_per_class` survive per class, best first. Boxes are
    0-based pixel-inclusive, so IoU uses `x2 + 1` widths, as the VOC evaluator.
    """
    n, k = scores.shape
    per_class = boxes if boxes.dim() == 3 else boxes[:, None, :].expand(n, k, 4)
    keep_mask = scores > score_threshold
    rows, cls = keep_mask.nonzero(as_tuple=True)
    cand_boxes = per_class[rows, cls].float()
    cand_scores = scores[rows, cls].float()
    widen = torch.tensor([0.0, 0.0, 1.0, 1.0], device=cand_boxes.device)
    keep = batched_nms(cand_boxes + widen, cand_scores, cls, nms_iou)   # sorted by score
    kept_cls = cls[keep]
    # rank of each kept box within its class (keep is in descending score order)
    order = torch.argsort(kept_cls, stable=True)
    sorted_cls = kept_cls[order]
    first = torch.searchsorted(sorted_cls, sorted_cls, side="left")
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - first
    keep = keep[rank < max_per_class]
    return {"boxes": cand_boxes[keep], "labels": cls[keep] + 1, "scores": cand_scores[keep]}


def clip_boxes(boxes: Tensor, width: int, height: int) -> Tensor:
    """Clip 0-based pixel boxes (any leading shape, last dim 4) to the image."""
    limit = boxes.new_tensor([width - 1, height - 1, width - 1, height - 1])
    return torch.minimum(boxes.clamp(min=0), limit)
