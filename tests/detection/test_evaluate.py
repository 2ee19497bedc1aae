"""VOC AP (11-point and area) on hand-worked cases and against a slow devkit-style reference,
and COCO AP through pycocotools."""

from __future__ import annotations

import numpy as np
import pytest

from data.errors import SppnetError
from data.results import ClassDetections
from data.voc import open_voc
from detection.evaluate import (area_ap, class_average_precision, evaluate_coco, evaluate_voc,
                                voc07_ap)


def _gt(boxes_by_image, difficult_by_image=None):
    boxes = {k: np.array(v, dtype=np.float64).reshape(-1, 4) for k, v in boxes_by_image.items()}
    difficult = {k: np.array((difficult_by_image or {}).get(k, [0] * len(v)), dtype=bool)
                 for k, v in boxes.items()}
    return boxes, difficult


def _dets(rows):
    """rows: (image_id, score, x1, y1, x2, y2)"""
    return ClassDetections([r[0] for r in rows], [r[1] for r in rows], [r[2:] for r in rows])


def test_hand_worked_eleven_point_and_area():
    # 4 objects; in score order the detections are TP, FP, TP, FP, TP.
    gt = _gt({"a": [[0, 0, 9, 9], [20, 20, 29, 29]], "b": [[0, 0, 9, 9], [50, 50, 59, 59]]})
    dets = _dets([("a", 0.9, 0, 0, 9, 9), ("a", 0.8, 40, 40, 45, 45), ("a", 0.7, 20, 20, 29, 29),
                  ("b", 0.6, 30, 30, 35, 35), ("b", 0.5, 0, 0, 9, 9)])
    ap, rec, prec = class_average_precision(dets, *gt, metric="voc07")
    np.testing.assert_allclose(rec, [0.25, 0.25, 0.5, 0.5, 0.75])
    np.testing.assert_allclose(prec, [1, 0.5, 2 / 3, 0.5, 0.6])
    # t = 0, .1, .2 -> 1;  .3, .4, .5 -> 2/3;  .6, .7 -> 0.6;  .8, .9, 1 -> 0
    assert ap == pytest.approx((3 + 3 * (2 / 3) + 2 * 0.6) / 11, abs=1e-12)
    ap_area, _, _ = class_average_precision(dets, *gt, metric="area")
    assert ap_area == pytest.approx(0.25 * (1 + 2 / 3 + 0.6), abs=1e-12)


def test_perfect_detector():
    gt = _gt({"a": [[0, 0, 9, 9]], "b": [[5, 5, 20, 30], [40, 40, 60, 60]]})
    dets = _dets([("a", 0.9, 0, 0, 9, 9), ("b", 0.8, 5, 5, 20, 30), ("b", 0.7, 40, 40, 60, 60)])
    for metric in ("voc07", "area"):
        assert class_average_precision(dets, *gt, metric=metric)[0] == pytest.approx(1.0)


def test_duplicate_detection_is_a_false_positive():
    gt = _gt({"a": [[0, 0, 9, 9]]})
    dets = _dets([("a", 0.9, 0, 0, 9, 9), ("a", 0.8, 0, 0, 9, 10)])
    _, rec, prec = class_average_precision(dets, *gt)
    np.testing.assert_allclose(prec, [1.0, 0.5])
    np.testing.assert_allclose(rec, [1.0, 1.0])


def test_difficult_objects_are_neither_tp_nor_fp():
    gt = _gt({"a": [[0, 0, 9, 9], [30, 30, 49, 49]]}, {"a": [0, 1]})
    # the difficult match comes first and must not count as an FP
    dets = _dets([("a", 0.9, 30, 30, 49, 49), ("a", 0.8, 0, 0, 9, 9)])
    ap, rec, prec = class_average_precision(dets, *gt, metric="area")
    np.testing.assert_allclose(rec, [0.0, 1.0])          # one positive only
    assert ap == pytest.approx(1.0)
    # a class whose only objects are difficult has no AP
    only_difficult = _gt({"a": [[0, 0, 9, 9]]}, {"a": [1]})
    assert class_average_precision(dets, *only_difficult)[0] is None


def test_iou_uses_pixel_areas_and_threshold():
    gt = _gt({"a": [[0, 0, 9, 9]]})          # 10 x 10 pixels
    # 10 x 5 pixel overlap, union 10*10 + 10*10 - 50 = 150 -> IoU 1/3: a miss
    miss = _dets([("a", 1.0, 0, 5, 9, 14)])
    assert class_average_precision(miss, *gt)[0] == 0.0
    # 10 x 8 overlap: 80 / 120 = 0.667: a hit
    hit = _dets([("a", 1.0, 0, 2, 9, 11)])
    assert class_average_precision(hit, *gt)[0] == pytest.approx(1.0)


def test_no_detections_is_zero_and_best_match_taken_by_higher_score():
    gt = _gt({"a": [[0, 0, 9, 9]]})
    assert class_average_precision(ClassDetections(), *gt)[0] == 0.0
    # the second detection's best match is the object the first one took: FP,
    # even though it overlaps another (unmatched) object less
    gt2 = _gt({"a": [[0, 0, 9, 9], [6, 0, 15, 9]]})
    dets = _dets([("a", 0.9, 0, 0, 9, 9), ("a", 0.8, 1, 0, 10, 9)])
    _, rec, prec = class_average_precision(dets, *gt2)
    np.testing.assert_allclose(prec, [1.0, 0.5])


def reference_devkit_ap(dets, gt_boxes, gt_difficult, metric):
    """A slow, literal port of VOCevaldet.m (loops over detections and objects)."""
    npos = sum(int((~d).sum()) for d in gt_difficult.values())
    order = sorted(range(len(dets)), key=lambda i: -dets.scores[i])
    taken = {k: [False] * len(v) for k, v in gt_boxes.items()}
    tp, fp = [], []
    for d in order:
        bb = dets.boxes[d]
        image = dets.image_ids[d]
        ovmax, jmax = -np.inf, -1
        for j, g in enumerate(gt_boxes.get(image, [])):
            iw = min(bb[2], g[2]) - max(bb[0], g[0]) + 1
            ih = min(bb[3], g[3]) - max(bb[1], g[1]) + 1
            if iw > 0 and ih > 0:
                ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1)
                      - iw * ih)
                if iw * ih / ua > ovmax:
                    ovmax, jmax = iw * ih / ua, j
        t = f = 0
        if ovmax > 0.5:
            if not gt_difficult[image][jmax]:
                if not taken[image][jmax]:
                    t, taken[image][jmax] = 1, True
                else:
                    f = 1
        else:
            f = 1
        tp.append(t)
        fp.append(f)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(float).eps)
    if metric == "voc07":
        ap = 0.0
        for t in np.arange(0, 1.1, 0.1):
            p = prec[rec >= t].max() if (rec >= t).any() else 0
            ap += p / 11
        return ap
    mrec = np.concatenate(([0], rec, [1]))
    mpre = np.concatenate(([0], prec, [0]))
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("metric", ["voc07", "area"])
def test_matches_slow_devkit_reference_on_noisy_detections(seed, metric):
    rng = np.random.default_rng(seed)
    gt_boxes, gt_difficult, rows = {}, {}, []
    for k in range(30):
        n = int(rng.integers(0, 5))
        xy = rng.uniform(0, 300, size=(n, 2))
        wh = rng.uniform(10, 150, size=(n, 2))
        boxes = np.round(np.concatenate([xy, xy + wh], axis=1))
        gt_boxes[f"im{k}"] = boxes
        gt_difficult[f"im{k}"] = rng.random(n) < 0.15
        for b in boxes:       # noisy copies of objects, duplicates included
            for _ in range(int(rng.integers(0, 4))):
                noise = rng.normal(0, 0.12, 4) * np.r_[b[2] - b[0], b[3] - b[1], b[2] - b[0],
                                                       b[3] - b[1]]
                rows.append((f"im{k}", float(rng.random()), *(b + noise)))
        for _ in range(int(rng.integers(0, 4))):   # pure false positives
            xy = rng.uniform(0, 300, 2)
            rows.append((f"im{k}", float(rng.random()) * 0.7, *xy, *(xy + rng.uniform(5, 100, 2))))
    dets = _dets(rows)
    ours = class_average_precision(dets, gt_boxes, gt_difficult, metric=metric)[0]
    assert ours == pytest.approx(reference_devkit_ap(dets, gt_boxes, gt_difficult, metric),
                                 abs=1e-12)


def test_evaluate_voc_mean_skips_classes_without_ground_truth(tiny_voc):
    ds = open_voc(tiny_voc, "test", classes=("bird", "cat", "dog"))
    dets = {"bird": _dets([("img3", 0.9, 9, 9, 29, 29)]), "cat": ClassDetections(),
            "dog": _dets([("img3", 0.5, 0, 0, 5, 5)])}
    result = evaluate_voc(ds, dets, metric="voc07")
    assert result["ap"] == {"bird": pytest.approx(1.0), "cat": 0.0, "dog": None}
    assert result["mAP"] == pytest.approx(0.5)


def test_detection_on_unknown_image_is_an_error(tiny_voc):
    ds = open_voc(tiny_voc, "test")
    with pytest.raises(SppnetError, match="img1"):
        evaluate_voc(ds, {"cat": _dets([("img1", 0.9, 0, 0, 5, 5)])})


def test_coco_perfect_partial_and_empty(tiny_voc):
    ds = open_voc(tiny_voc, "all")
    perfect = {}
    for image in ds:
        for obj in image.objects:
            perfect.setdefault(obj.name, []).append((image.image_id, 0.9, *obj.box))
    perfect = {k: _dets(v) for k, v in perfect.items()}
    result = evaluate_coco(ds, perfect)
    assert result["AP"] == pytest.approx(1.0) and result["AP50"] == pytest.approx(1.0)
    # a class without detections counts as 0 in the mean (pycocotools alone would drop it)
    partial = dict(perfect, dog=ClassDetections())
    result = evaluate_coco(ds, partial)
    assert result["ap"]["dog"] == 0.0
    assert result["AP"] == pytest.approx(2 / 3)
    # no detections at all is a valid result
    empty = evaluate_coco(ds, {})
    assert empty["AP"] == 0.0 and set(empty["ap"].values()) == {0.0}
