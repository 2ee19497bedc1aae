"""Image scales and the per-box choice of scale."""

from __future__ import annotations

import math

import torch

from detection.scales import (PAPER_SCALES, assign_scales, box_target_side, resize_image,
                              scale_factor)


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


def test_small_preset_scales_bring_every_object_size_near_the_trunk_input():
    """On images of 180-400 px (shorter side, aspect up to 2), every box from a tenth of the
    shorter side to the whole image has a multi-scale where its side is within 1.25x of the
    side the trunk learned: the reason for the preset's wide scale set."""
    from detection.presets import get_preset

    preset = get_preset("small")
    target = box_target_side(preset.crop_size)
    for shorter in (180, 230, 300, 400):
        for longer in (shorter, 2 * shorter):
            factors = [scale_factor(shorter, longer, s, preset.max_side)
                       for s in preset.multi_scales]
            sides = torch.logspace(math.log10(shorter / 10), math.log10(shorter), 30)
            boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides),
                                 sides - 1, sides - 1], 1)
            chosen = assign_scales(boxes, factors, target)
            ratio = sides * torch.tensor(factors, dtype=torch.float32)[chosen] / target
            assert ratio.max() <= 1.25 and ratio.min() >= 1 / 1.25, (shorter, longer)
