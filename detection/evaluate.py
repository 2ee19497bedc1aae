"""Detection metrics: PASCAL VOC average precision (VOC2007 11-point and VOC2010+ area) and COCO
AP@[.5:.95] through pycocotools, for the same detections.

VOC matching follows the devkit's `VOCevaldet`: detections of a class sorted by score (a stable
sort, as MATLAB's), each assigned to the ground truth of its image with the highest IoU (areas with
+1, as pixel indices), a true positive when that IoU is above 0.5 and the object is still unmatched,
a false positive when it is taken or the IoU is too low, and neither when the object is 'difficult'.
Difficult objects do not count in the number of positives. The 11-point thresholds are
`numpy.arange(0, 1.1, 0.1)` as in the reference Python ports (py-faster-rcnn, detectron2), so a
recall of exactly 0.3, 0.6 or 0.7 falls below that floating-point threshold there too.
"""

from __future__ import annotations

import contextlib
import io
from typing import Mapping

import numpy as np
import torch

from data.errors import SppnetError
from data.results import ClassDetections
from data.voc import VOCDataset
from detection.boxes import pixel_iou

METRICS = ("voc07", "area")
VOC_IOU_THRESHOLD = 0.5


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point AP: mean over t in {0, 0.1, ..., 1} of max precision at recall >= t."""
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        above = recall >= t
        ap += (float(np.max(precision[above])) if above.any() else 0.0) / 11.0
    return ap


def area_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+ AP: area under the monotone (non-increasing) envelope of the PR curve."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def average_precision(recall: np.ndarray, precision: np.ndarray, metric: str = "voc07") -> float:
    """AP of a PR curve under `metric` ('voc07' or 'area')."""
    if metric == "voc07":
        return voc07_ap(recall, precision)
    if metric == "area":
        return area_ap(recall, precision)
    raise ValueError(f"unknown metric {metric!r}, expected one of {METRICS}")


def match_detections(dets: ClassDetections, gt_boxes: Mapping[str, np.ndarray],
                     gt_difficult: Mapping[str, np.ndarray],
                     iou_threshold: float = VOC_IOU_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Greedy VOC matching of one class's detections, in descending score order.

    Returns `(tp, fp)` as 0/1 arrays in that order. A detection's best ground truth does not
    depend on what earlier ones took, so a detection is a TP exactly when it is the first, in
    score order, whose best match is that (non-difficult) object with IoU above the threshold.
    """
    order = np.argsort(-dets.scores, kind="stable")
    image_ids = np.array(dets.image_ids, dtype=object)[order]
    boxes = dets.boxes[order]
    n = len(order)
    best_iou = np.zeros(n)
    best_gt = np.full(n, -1, dtype=np.int64)       # index of the object within its image
    is_difficult = np.zeros(n, dtype=bool)
    image_index = np.zeros(n, dtype=np.int64)
    unique_ids, inverse = np.unique(image_ids.astype(str), return_inverse=True) if n else ([], [])
    groups = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(np.asarray(inverse)[groups], np.arange(len(unique_ids) + 1))
    for k, image_id in enumerate(unique_ids):
        rows = groups[bounds[k]:bounds[k + 1]]
        image_index[rows] = k
        gts = gt_boxes.get(image_id)
        if gts is None or len(gts) == 0:
            continue
        iou = pixel_iou(torch.as_tensor(boxes[rows]),
                        torch.as_tensor(gts, dtype=torch.float64)).numpy()
        best_gt[rows] = iou.argmax(axis=1)
        best_iou[rows] = iou.max(axis=1)
        is_difficult[rows] = np.asarray(gt_difficult[image_id], dtype=bool)[best_gt[rows]]
    hit = best_iou > iou_threshold
    candidates = np.flatnonzero(hit & ~is_difficult)
    keys = image_index[candidates] * (1 << 20) + best_gt[candidates]
    _, first = np.unique(keys, return_index=True)   # first occurrence in score order
    tp = np.zeros(n)
    tp[candidates[first]] = 1.0
    fp = np.where(hit & is_difficult, 0.0, 1.0) - tp
    return tp, fp


def class_average_precision(dets: ClassDetections, gt_boxes: Mapping[str, np.ndarray],
                            gt_difficult: Mapping[str, np.ndarray], metric: str = "voc07",
                            iou_threshold: float = VOC_IOU_THRESHOLD
                            ) -> tuple[float | None, np.ndarray, np.ndarray]:
    """AP of one class and its PR curve `(ap, recall, precision)`.

    AP is None when the class has no non-difficult ground truth (it stays out of the mean),
    and 0.0 when it has ground truth but no detections.
    """
    positives = int(sum(int(np.count_nonzero(~np.asarray(d, dtype=bool)))
                        for d in gt_difficult.values()))
    if positives == 0:
        return None, np.zeros(0), np.zeros(0)
    tp, fp = match_detections(dets, gt_boxes, gt_difficult, iou_threshold)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / float(positives)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return average_precision(recall, precision, metric), recall, precision


def ground_truth_by_class(dataset: VOCDataset) -> dict[str, tuple[dict, dict]]:
    """Per class: `({image_id: boxes [G,4]}, {image_id: difficult [G]})` over the split."""
    out: dict[str, tuple[dict, dict]] = {c: ({}, {}) for c in dataset.classes}
    for image in dataset:
        boxes, difficult = image.boxes().astype(np.float64), image.difficult()
        names = np.array([o.name for o in image.objects], dtype=object)
        for name in set(names.tolist()):
            sel = names == name
            out[name][0][image.image_id] = boxes[sel]
            out[name][1][image.image_id] = difficult[sel]
    return out


def check_image_ids(dataset: VOCDataset, detections: Mapping[str, ClassDetections]) -> None:
    """Refuse detections on images outside the split (the devkit errors the same way)."""
    for name, dets in detections.items():
        for image_id in set(dets.image_ids):
            if image_id not in dataset:
                raise SppnetError(f"detections of class {name!r} name image {image_id!r}, which "
                                  f"is not in split {dataset.split!r} of {dataset.root}")


def evaluate_voc(dataset: VOCDataset, detections: Mapping[str, ClassDetections],
                 metric: str = "voc07") -> dict:
    """Per-class VOC AP and their mean over classes that have ground truth.

    Returns `{"mAP": float | None, "ap": {class: float | None}, "metric": metric,
    "curves": {class: (recall, precision)}}`.
    """
    if metric not in METRICS:
        raise SppnetError(f"unknown metric {metric!r}, expected one of {', '.join(METRICS)}")
    check_image_ids(dataset, detections)
    gt = ground_truth_by_class(dataset)
    ap: dict[str, float | None] = {}
    curves = {}
    for name in dataset.classes:
        dets = detections.get(name, ClassDetections())
        ap[name], recall, precision = class_average_precision(dets, *gt[name], metric=metric)
        curves[name] = (recall, precision)
    valid = [v for v in ap.values() if v is not None]
    return {"mAP": float(np.mean(valid)) if valid else None, "ap": ap, "metric": metric,
            "curves": curves}


def _coco_ground_truth(dataset: VOCDataset) -> dict:
    """The split as a COCO dataset dict; boxes `[x, y, w, h]` with pixel widths (x2 - x1 + 1),
    difficult objects as `iscrowd` (pycocotools' only way to make an object ignored)."""
    images, annotations = [], []
    class_id = {c: k + 1 for k, c in enumerate(dataset.classes)}
    for i, image in enumerate(dataset, start=1):
        images.append({"id": i, "width": image.width, "height": image.height,
                       "file_name": image.path.name})
        for obj in image.objects:
            x1, y1, x2, y2 = obj.box
            w, h = x2 - x1 + 1, y2 - y1 + 1
            annotations.append({"id": len(annotations) + 1, "image_id": i,
                                "category_id": class_id[obj.name], "bbox": [x1, y1, w, h],
                                "area": w * h, "iscrowd": int(obj.difficult)})
    categories = [{"id": k, "name": c} for c, k in class_id.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def evaluate_coco(dataset: VOCDataset, detections: Mapping[str, ClassDetections]) -> dict:
    """COCO AP@[.5:.95], AP50 and AP75 with pycocotools, and per-class AP@[.5:.95].

    A class with ground truth but no detections gets 0 (pycocotools itself would leave it out of
    the mean); a class without ground truth gets None. "No detections at all" is valid (AP 0).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    check_image_ids(dataset, detections)
    gt_dict = _coco_ground_truth(dataset)
    image_index = {image.image_id: i for i, image in enumerate(dataset, start=1)}
    has_gt = {c: False for c in dataset.classes}
    for image in dataset:
        for obj in image.objects:
            has_gt[obj.name] = True
    results = []
    for k, name in enumerate(dataset.classes, start=1):
        dets = detections.get(name, ClassDetections())
        wh = dets.boxes[:, 2:] - dets.boxes[:, :2] + 1
        for image_id, score, box, size in zip(dets.image_ids, dets.scores, dets.boxes, wh):
            results.append({"image_id": image_index[image_id], "category_id": k,
                            "bbox": [float(box[0]), float(box[1]), float(size[0]),
                                     float(size[1])], "score": float(score)})
    per_class: dict[str, float | None] = {c: (0.0 if has_gt[c] else None)
                                          for c in dataset.classes}
    summary = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    if results and any(has_gt.values()):
        with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints progress
            coco_gt = COCO()
            coco_gt.dataset = gt_dict
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(results)
            evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
        # precision: [iou thresholds, recall points, classes, area ranges, max dets]
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        by_iou = np.zeros((precision.shape[0], len(dataset.classes)))
        for k, name in enumerate(dataset.classes):
            if not has_gt[name]:
                continue
            p = precision[:, :, k]
            # -1 marks "no detections" for a class that has ground truth: that is precision 0
            by_iou[:, k] = np.where(p > -1, p, 0.0).mean(axis=1)
            per_class[name] = float(by_iou[:, k].mean())
        valid = [k for k, c in enumerate(dataset.classes) if has_gt[c]]
        summary = {"AP": float(by_iou[:, valid].mean()), "AP50": float(by_iou[0, valid].mean()),
                   "AP75": float(by_iou[5, valid].mean())}
    if not any(has_gt.values()):
        summary = {"AP": None, "AP50": None, "AP75": None}
    return {**summary, "ap": per_class}


def format_ap_table(ap: Mapping[str, float | None], mean: float | None, title: str = "AP") -> str:
    """A readable per-class table; APs as percentages with one decimal, '-' for no ground truth."""
    width = max([len(c) for c in ap] + [5])
    lines = [f"{'class':<{width}}  {title:>6}"]
    for name, value in ap.items():
        lines.append(f"{name:<{width}}  {'-' if value is None else f'{100 * value:6.1f}':>6}")
    lines.append(f"{'mAP':<{width}}  {'-' if mean is None else f'{100 * mean:6.1f}':>6}")
    return "\n".join(lines)


def score_summary(voc: Mapping, coco: Mapping) -> dict:
    """The JSON summary of `sppnet score`: fractions, not percentages."""
    return {"mAP": voc["mAP"], "ap": dict(voc["ap"]), "metric": voc["metric"], "coco": dict(coco)}

