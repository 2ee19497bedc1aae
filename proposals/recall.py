"""Recall of ground truth by proposals: the figures that say whether proposals are good enough.

A ground-truth box is recalled at IoU t when some proposal overlaps it with IoU >= t. IoU is the
VOC devkit's, with pixel-inclusive widths (`x2 - x1 + 1`): `pixel_box_iou`, the formula of
`torchvision.ops.box_iou` on boxes shifted to continuous coordinates (as `detection.evaluate`
does), written in NumPy so that `sppnet proposals` served from the cache does not spend seconds
importing torch and torchvision (the tests check it against `torchvision.ops.box_iou`). Difficult
objects are left out, as in VOC evaluation. Average recall (AR, Hosang et al.) is the mean of the recalls at
IoU 0.5, 0.55, ..., 0.95. `recall_curve` gives recall against the number of proposals kept
(the first n of each image, in rank order), for a plot.

Vectorised per image: one `[G, N]` IoU matrix and a cumulative maximum along the proposals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["RecallStats", "AR_THRESHOLDS", "pixel_box_iou", "best_overlaps", "proposal_recall",
           "recall_curve", "default_counts"]

#: IoU thresholds 0.5:0.05:0.95 of average recall.
AR_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def pixel_box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU `[A, B]` (float64) of pixel-inclusive 0-based xyxy boxes `a` `[A, 4]` and `b` `[B, 4]`:
    widths are `x2 - x1 + 1`, boxes that only touch have IoU 0."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0] + 1.0) * (a[:, 3] - a[:, 1] + 1.0)
    area_b = (b[:, 2] - b[:, 0] + 1.0) * (b[:, 3] - b[:, 1] + 1.0)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:]) + 1.0
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def best_overlaps(proposals: np.ndarray, gt_boxes: np.ndarray,
                  counts: Sequence[int] | None = None) -> np.ndarray:
    """For each ground-truth box, its best IoU with the first n proposals, for each n in
    `counts` (default: all proposals, one column).

    Args:
        proposals: `[N, 4]` 0-based pixel-inclusive xyxy, in rank order.
        gt_boxes: `[G, 4]` same format.
        counts: numbers of proposals n (n > N means all N).

    Returns:
        float64 `[G, len(counts)]` (0 where no proposal is considered).
    """
    proposals = np.asarray(proposals, dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    n = len(proposals)
    counts = [n] if counts is None else [int(c) for c in counts]
    if len(gt_boxes) == 0:
        return np.zeros((0, len(counts)))
    if n == 0:
        return np.zeros((len(gt_boxes), len(counts)))
    iou = pixel_box_iou(gt_boxes, proposals)                               # [G, N]
    running = np.maximum.accumulate(iou, axis=1)                           # best of first j+1
    columns = np.clip(np.asarray(counts), 0, n)
    out = running[:, np.maximum(columns - 1, 0)]
    out[:, columns == 0] = 0.0
    return out


@dataclass(frozen=True)
class RecallStats:
    """Recall figures over a set of images (non-difficult ground truth only)."""

    objects: int
    recall_50: float
    recall_70: float
    average_recall: float
    counts: tuple[int, ...]
    curve_50: tuple[float, ...]
    curve_70: tuple[float, ...]
    curve_ar: tuple[float, ...]

    def to_dict(self) -> dict:
        """JSON-ready: the recall figures and the curve against the number of proposals."""
        return {"objects": self.objects, "recall@0.5": self.recall_50,
                "recall@0.7": self.recall_70, "average_recall": self.average_recall,
                "curve": {"proposals": list(self.counts), "recall@0.5": list(self.curve_50),
                          "recall@0.7": list(self.curve_70),
                          "average_recall": list(self.curve_ar)}}


def default_counts(max_proposals: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to and including `max_proposals`."""
    counts, decade = [], 1
    while decade <= max_proposals:
        counts += [c for c in (decade, 2 * decade, 5 * decade) if c <= max_proposals]
        decade *= 10
    if not counts or counts[-1] != max_proposals:
        counts.append(int(max_proposals))
    return tuple(counts)


def _recall_at(overlaps: np.ndarray, threshold: float) -> np.ndarray:
    """Recall per column of `[G, C]` best overlaps at `threshold` (NaN-free; 0 objects -> 0)."""
    if overlaps.shape[0] == 0:
        return np.zeros(overlaps.shape[1])
    return (overlaps >= threshold - 1e-12).mean(axis=0)


def recall_curve(proposals: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray],
                 difficult: Sequence[np.ndarray] | None = None,
                 counts: Sequence[int] | None = None) -> RecallStats:
    """Recall at IoU 0.5 and 0.7 and average recall, over all images, for all proposals and for
    the first n of each image for n in `counts` (default: `default_counts` of the longest list).

    `proposals[i]`, `gt_boxes[i]`, `difficult[i]` belong to image i; boxes 0-based xyxy.
    """
    if len(proposals) != len(gt_boxes) or (difficult is not None
                                           and len(difficult) != len(gt_boxes)):
        raise ValueError("proposals, gt_boxes and difficult must have one entry per image")
    longest = max((len(p) for p in proposals), default=0)
    counts = tuple(int(c) for c in (counts or default_counts(max(longest, 1))))
    columns = list(counts) + [max(longest, 1)]
    per_image = []
    for i, (props, gts) in enumerate(zip(proposals, gt_boxes)):
        gts = np.asarray(gts, dtype=np.float64).reshape(-1, 4)
        if difficult is not None:
            gts = gts[~np.asarray(difficult[i], dtype=bool).reshape(-1)]
        if len(gts):
            per_image.append(best_overlaps(props, gts, columns))
    overlaps = np.concatenate(per_image) if per_image else np.zeros((0, len(columns)))
    r50, r70 = _recall_at(overlaps, 0.5), _recall_at(overlaps, 0.7)
    ar = np.mean([_recall_at(overlaps, t) for t in AR_THRESHOLDS], axis=0)
    return RecallStats(objects=int(overlaps.shape[0]), recall_50=float(r50[-1]),
                       recall_70=float(r70[-1]), average_recall=float(ar[-1]), counts=counts,
                       curve_50=tuple(float(v) for v in r50[:-1]),
                       curve_70=tuple(float(v) for v in r70[:-1]),
                       curve_ar=tuple(float(v) for v in ar[:-1]))


def proposal_recall(proposals: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray],
                    difficult: Sequence[np.ndarray] | None = None) -> dict[str, float]:
    """`{"recall@0.5", "recall@0.7", "average_recall", "objects"}` over all images."""
    stats = recall_curve(proposals, gt_boxes, difficult, counts=(1,))
    return {"recall@0.5": stats.recall_50, "recall@0.7": stats.recall_70,
            "average_recall": stats.average_recall, "objects": stats.objects}
