"""Pixel IoU and box regression targets."""

from __future__ import annotations

import numpy as np
import torch

from detection.boxes import (apply_deltas, box_deltas, boxes_in_image, clip_boxes, mirror_boxes,
                             pixel_iou, scale_boxes)


def test_pixel_iou_counts_plus_one():
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    b = torch.tensor([[5.0, 0.0, 14.0, 9.0], [10.0, 10.0, 12.0, 12.0]])
    # 5 x 10 overlap of two 10 x 10 boxes: 50 / 150
    assert torch.allclose(pixel_iou(a, b), torch.tensor([[50 / 150, 0.0]]))


def test_deltas_round_trip_and_identity():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 100
    p = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=g) * 60], 1)
    xy = torch.rand(50, 2, generator=g) * 100
    t = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=g) * 60], 1)
    d = box_deltas(p, t)
    assert torch.allclose(apply_deltas(p, d), t, atol=1e-3)
    assert torch.allclose(box_deltas(p, p), torch.zeros(50, 4), atol=1e-6)
    per_class = apply_deltas(p, torch.stack([d, torch.zeros_like(d)], dim=1))   # [N, K, 4]
    assert torch.allclose(per_class[:, 0], t, atol=1e-3)
    assert torch.allclose(per_class[:, 1], p, atol=1e-4)


def test_mirror_boxes_frame_the_same_pixels_in_the_flipped_image():
    image = np.zeros((20, 30))
    image[4:9, 2:7] = 1                                  # box (2, 4, 6, 8), pixel-inclusive
    box = torch.tensor([[2.0, 4.0, 6.0, 8.0]])
    x1, y1, x2, y2 = mirror_boxes(box, 30)[0].int().tolist()
    assert image[:, ::-1][y1:y2 + 1, x1:x2 + 1].sum() == image.sum() == 25
    assert (x1, x2) == (23, 27)
    assert torch.equal(mirror_boxes(mirror_boxes(box, 30), 30), box)


def test_scale_boxes_scales_pixel_spans_and_back():
    """A box's pixel span [x1, x2 + 1) is what scales: the whole image's box goes to the whole
    resized image's, and the reciprocal factors give the boxes back."""
    boxes = torch.tensor([[0.0, 0.0, 399.0, 299.0], [10.0, 20.0, 29.0, 59.0]])
    half = scale_boxes(boxes, 0.5, 0.25)
    assert torch.equal(half[0], torch.tensor([0.0, 0.0, 199.0, 74.0]))
    assert torch.equal(half[1], torch.tensor([5.0, 5.0, 14.0, 14.0]))
    assert torch.allclose(scale_boxes(half, 2.0, 4.0), boxes)
    assert scale_boxes(boxes, 1.0, 1.0) is boxes      # no rounding where nothing is scaled


def test_clip_boxes_keeps_them_inside_the_image():
    assert clip_boxes(torch.tensor([[-3.0, 2, 700, 90]]), 640, 80).tolist() == [[0, 2, 639, 79]]


def test_boxes_in_image_tells_boxes_outside_from_boxes_reaching_out():
    boxes = torch.tensor([[10.0, 10, 50, 50],      # inside
                          [-1.0, 0, 100, 80],      # the border written one pixel out: forgiven
                          [-5.0, 10, 50, 50],      # reaches 5 px beyond the left edge
                          [90.0, 10, 140, 50],     # reaches beyond the right edge
                          [120.0, 10, 150, 50],    # wholly right of the image
                          [10.0, -40, 50, -2]])    # wholly above it
    clipped, outside, reaching = boxes_in_image(boxes, 100, 80)
    assert outside.tolist() == [False, False, False, False, True, True]
    assert reaching.tolist() == [False, False, True, True, False, False]
    assert clipped[:4].tolist() == [[10, 10, 50, 50], [0, 0, 99, 79], [0, 10, 50, 50],
                                    [90, 10, 99, 50]]
