"""Fixtures shared by the detection tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detection.backbones import build_net
from detection.regions import label_regions
from detection.train import TrainImage


@pytest.fixture(scope="module")
def net():
    """The small preset's ZF-5 with seeded random weights and a 99 px R-CNN crop."""
    return build_net("zf5_small", seed=0, crop_size=99)


@pytest.fixture
def images(draw):
    """Four drawn images, each with its rectangles as ground truth and random proposals."""
    out = []
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels, voc_boxes = draw(i)
        gt = torch.tensor(voc_boxes, dtype=torch.float32) - torch.tensor([1, 1, 1, 1])
        xy = rng.uniform(0, [150, 100], (30, 2))
        wh = rng.uniform(15, 60, (30, 2))
        proposals = np.concatenate([xy, xy + wh], axis=1)
        regions = label_regions(proposals, gt, torch.ones(len(gt), dtype=torch.int64), 1)
        out.append(TrainImage(f"img{i}", pixels, regions))
    return out
