"""Labelling of training regions and fine-tuning samples."""

from __future__ import annotations

import numpy as np
import torch

from detection.regions import label_regions, sample_rows


def test_labels_from_overlap_with_ground_truth_first():
    gt = torch.tensor([[0.0, 0.0, 9.0, 9.0], [20.0, 20.0, 39.0, 39.0]])
    labels = torch.tensor([2, 1])
    props = torch.tensor([[0.0, 0.0, 9.0, 8.0],      # IoU 0.9 with gt 0 -> class 2
                          [20.0, 20.0, 29.0, 39.0],  # IoU 0.5 with gt 1 -> class 1
                          [100.0, 100.0, 120.0, 120.0]])
    r = label_regions(props, gt, labels, num_classes=2)
    assert r.gt_class.tolist() == [2, 1, 0, 0, 0]
    assert r.label.tolist() == [2, 1, 2, 1, 0]
    assert torch.allclose(r.max_iou[2], torch.tensor([0.0, 0.9]))
    assert r.target[3].tolist() == [20.0, 20.0, 39.0, 39.0]
    no_gt = label_regions(props, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2,
                          include_gt=False)
    assert no_gt.label.tolist() == [0, 0, 0] and no_gt.max_iou.shape == (3, 2)


def test_sample_keeps_the_foreground_fraction():
    g = torch.Generator().manual_seed(0)
    gt = torch.tensor([[50.0, 50.0, 149.0, 149.0]])
    xy = torch.rand(400, 2, generator=g) * 150
    props = torch.cat([xy, xy + 30 + torch.rand(400, 2, generator=g) * 100], 1)
    r = label_regions(props, gt, torch.tensor([1]), 1)
    rows = sample_rows(r, 64, 0.25, np.random.default_rng(0))
    assert len(rows) == 64
    assert (r.label[rows] > 0).sum() == min(16, int((r.label > 0).sum()))
    bg = r.best_iou[rows][r.label[rows] == 0]
    assert bool(((bg >= 0.1) & (bg < 0.5)).all())
