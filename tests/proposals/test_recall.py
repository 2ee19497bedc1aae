"""Recall of ground truth by proposals, on hand-made boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from proposals.recall import (AR_THRESHOLDS, best_overlaps, default_counts, pixel_box_iou,
                              proposal_recall, recall_curve)


def test_pixel_iou_matches_torchvision_with_plus_one_widths():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, size=(2, 50, 2))
    wh = rng.uniform(0, 60, size=(2, 50, 2))
    a, b = np.concatenate([xy[0], xy[0] + wh[0]], 1), np.concatenate([xy[1], xy[1] + wh[1]], 1)
    shift = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    expected = box_iou(torch.as_tensor(a) + shift, torch.as_tensor(b) + shift).numpy()
    np.testing.assert_allclose(pixel_box_iou(a, b), expected, rtol=1e-12, atol=1e-12)
    # by hand: 10x10 boxes overlapping on 5x10 pixels -> 50 / 150; touching -> 0
    np.testing.assert_allclose(pixel_box_iou([[0, 0, 9, 9]], [[5, 0, 14, 9], [10, 0, 19, 9]]),
                               [[50 / 150, 0.0]])


def test_best_overlaps_for_the_first_n_proposals():
    gt = np.array([[0, 0, 9, 9], [20, 20, 39, 39]])
    props = np.array([[100, 100, 110, 110],   # nothing
                      [0, 0, 9, 9],           # gt 0 exactly
                      [20, 20, 39, 29],       # half of gt 1
                      [20, 20, 39, 39]])      # gt 1 exactly
    got = best_overlaps(props, gt, counts=[0, 1, 2, 3, 4, 100])
    np.testing.assert_allclose(got, [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0.5, 1, 1]])
    assert best_overlaps(np.zeros((0, 4)), gt).shape == (2, 1)
    assert best_overlaps(props, np.zeros((0, 4))).shape == (0, 1)


def test_recall_figures_by_hand():
    # image 1: gt A found exactly, gt B at IoU 0.6 (box 12 of 20 rows), gt C difficult (ignored)
    gts1 = np.array([[0, 0, 9, 9], [50, 50, 69, 69], [200, 200, 210, 210]])
    props1 = np.array([[0, 0, 9, 9], [50, 50, 69, 61]])
    diff1 = np.array([False, False, True])
    # image 2: one gt, missed; image 3: no ground truth at all
    gts2 = np.array([[0, 0, 19, 19]])
    props2 = np.array([[30, 30, 40, 40]])
    stats = recall_curve([props1, props2, props1], [gts1, gts2, np.zeros((0, 4))],
                         [diff1, np.array([False]), np.zeros(0, bool)], counts=[1, 2])
    assert stats.objects == 3
    assert stats.recall_50 == pytest.approx(2 / 3)
    assert stats.recall_70 == pytest.approx(1 / 3)
    # A counts at all 10 thresholds, B (IoU exactly 0.6) at 0.5, 0.55, 0.6, the missed one never
    assert stats.average_recall == pytest.approx((10 + 3) / (3 * 10))
    assert stats.curve_50 == pytest.approx((1 / 3, 2 / 3))
    assert stats.curve_70 == pytest.approx((1 / 3, 1 / 3))
    assert proposal_recall([props1], [gts1], [diff1]) == {
        "recall@0.5": 1.0, "recall@0.7": 0.5, "average_recall": pytest.approx(0.65),
        "objects": 2}


def test_curve_is_monotone_and_ends_at_the_totals():
    rng = np.random.default_rng(1)
    gts = [rng.uniform(0, 200, (5, 2)) for _ in range(4)]
    gts = [np.concatenate([g, g + 30], 1) for g in gts]
    props = [np.concatenate([p, p + rng.uniform(10, 50, (300, 2))], 1)
             for p in (rng.uniform(0, 200, (300, 2)) for _ in range(4))]
    stats = recall_curve(props, gts)
    assert stats.counts == default_counts(300) == (1, 2, 5, 10, 20, 50, 100, 200, 300)
    for curve, total in ((stats.curve_50, stats.recall_50), (stats.curve_70, stats.recall_70),
                         (stats.curve_ar, stats.average_recall)):
        assert all(x <= y + 1e-12 for x, y in zip(curve, curve[1:]))
        assert curve[-1] == pytest.approx(total)
    assert len(AR_THRESHOLDS) == 10 and AR_THRESHOLDS[0] == 0.5 and AR_THRESHOLDS[-1] == 0.95


def test_no_objects_gives_zero_recall_not_nan():
    stats = recall_curve([np.zeros((3, 4))], [np.zeros((0, 4))])
    assert stats.objects == 0 and stats.recall_50 == 0.0 and stats.average_recall == 0.0
    with pytest.raises(ValueError):
        recall_curve([np.zeros((0, 4))], [])
