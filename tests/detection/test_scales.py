"""Image scales and the per-box choice of scale."""

from __future__ import annotations

import torch

from detection.scales import PAPER_SCALES, assign_scales, resize_image, scale_factor


def test_shorter_side_and_cap():
    assert scale_factor(375, 500, 688) == 688 / 375
    assert scale_factor(100, 1000, 688, max_side=2000) == 2.0      # capped by the longer side


def test_resize_rounds_size():
    assert resize_image(torch.zeros(1, 3, 375, 500), 688 / 375).shape[-2:] == (688, 917)


def test_each_box_goes_to_the_scale_closest_to_224():
    factors = [scale_factor(375, 500, s) for s in PAPER_SCALES]
    boxes = torch.tensor([[0.0, 0.0, 499.0, 374.0], [10.0, 10.0, 49.0, 49.0]])
    chosen = assign_scales(boxes, factors)
    assert chosen.tolist() == [0, 4]      # the whole image at 480, a 40 px box at 1200
    area = lambda k, b: ((b[2] - b[0] + 1) * factors[k]) * ((b[3] - b[1] + 1) * factors[k])
    for b, k in zip(boxes, chosen):
        assert all(abs(area(k, b) - 224 ** 2) <= abs(area(j, b) - 224 ** 2) for j in range(5))
