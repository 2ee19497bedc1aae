"""Test-time post-processing: per-class NMS, the per-class cap and box voting, from class
scores of boxes to torchvision-style detections `{"boxes": [M, 4], "labels": [M], "scores":
[M]}` (label 0 is the background, so class k of the score matrix is label k + 1)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from detection.boxes import pixel_iou

NMS_IOU = 0.3
MAX_PER_CLASS = 100
VOTE_IOU = 0.5      # box voting's cluster: the IoU at which VOC counts a detection as found


def detections_from_scores(boxes: Tensor, scores: Tensor, score_threshold: float = -float("inf"),
                           nms_iou: float = NMS_IOU, max_per_class: int = MAX_PER_CLASS,
                           vote_iou: float | None = None) -> dict:
    """Per-class NMS of `boxes` scored by `scores`.

    `boxes` is `[N, 4]` (shared by all classes) or `[N, K, 4]` (per class, after box
    regression); `scores` is `[N, K]`. Candidates at or below `score_threshold` are dropped before
    NMS at IoU `nms_iou`; at most `max_per_class` survive per class, best first. Boxes are
    0-based pixel-inclusive, so IoU uses `x2 + 1` widths, as the VOC evaluator. With
    `vote_iou`, each surviving box is then moved by `vote_boxes`; its score stays.
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
    kept_boxes = cand_boxes[keep]
    if vote_iou is not None:
        kept_boxes = vote_boxes(kept_boxes, cls[keep], cand_boxes, cand_scores, cls, vote_iou)
    return {"boxes": kept_boxes, "labels": cls[keep] + 1, "scores": cand_scores[keep]}


def vote_boxes(kept: Tensor, kept_class: Tensor, candidates: Tensor, candidate_scores: Tensor,
               candidate_class: Tensor, vote_iou: float) -> Tensor:
    """Box voting (Gidaris and Komodakis, 2015; neither SPP-net nor R-CNN has it): each kept
    box becomes the mean of its class's candidates that overlap it at IoU >= `vote_iou`
    (itself among them), weighted by their positive scores. NMS keeps one box of a cluster and
    drops the rest; the mean uses the whole cluster's evidence for where the object is. A box
    whose cluster has no positive score stays where it is. One IoU block per class (at most
    `max_per_class` by its candidates), so memory stays bounded on many classes."""
    voted = kept.clone()
    weights_all = candidate_scores.clamp(min=0)
    for k in kept_class.unique().tolist():
        rows = (kept_class == k).nonzero(as_tuple=True)[0]
        mine = (candidate_class == k) & (weights_all > 0)
        boxes, weights = candidates[mine], weights_all[mine]
        if len(boxes) == 0:
            continue
        w = (pixel_iou(kept[rows], boxes) >= vote_iou).to(weights) * weights[None, :]
        total = w.sum(1, keepdim=True)
        moved = (w @ boxes) / total.clamp(min=torch.finfo(w.dtype).tiny)
        voted[rows] = torch.where(total > 0, moved, kept[rows])
    return voted
