"""`extract`: SPP-net (conv once, project, pool) and R-CNN (warp each box) against per-box
references, multi-scale assignment, and the timing hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from detection.features import (ConvMaps, ExtractSettings, box_windows, conv_maps,
                                conv_maps_for_boxes, extract)
from detection.rcnn_warp import warp_regions
from detection.scales import assign_scales, resize_image, scale_factor
from detection.spp import project_boxes, spp_pool_maps
from detection.timing import StageTimer


@pytest.fixture(scope="module")
def image_and_boxes(random_scene):
    image, boxes = random_scene(0, 120, 160, 12, 120, (4, 100))
    boxes[0] = [0, 0, 159, 119]         # large enough for the smaller of two scales
    return image, torch.tensor(boxes, dtype=torch.float32)


def test_spp_equals_per_box_crop_and_adaptive_pool(net, image_and_boxes):
    image, boxes = image_and_boxes
    settings = ExtractSettings(scales=(200, 400), max_side=800)
    timer = StageTimer("cpu")
    ours = extract(net, image, boxes, "spp", settings, timer)
    assert set(timer.seconds) == {"conv", "pool", "fc"}
    with torch.inference_mode():
        pre = net.preprocess(image)
        factors = [scale_factor(120, 160, s, 800) for s in settings.scales]
        maps = [net.trunk(resize_image(pre, f))[0] for f in factors]
        chosen = assign_scales(boxes, factors)
        assert set(chosen.tolist()) == {0, 1}      # both scales are used
        for box, k in zip(boxes, chosen.tolist()):
            fmap = maps[k]
            x1, y1, x2, y2 = project_boxes(box[None] * factors[k], net.stride, net.first_centre,
                                           fmap.shape[1], fmap.shape[2])[0].tolist()
            crop = fmap[:, y1:y2 + 1, x1:x2 + 1]
            pooled = torch.cat([nn.AdaptiveMaxPool2d(n)(crop).flatten() for n in net.spp_levels])
            expected = net.spp_fc(pooled[None])[0]
            row = int((boxes == box).all(dim=1).nonzero()[0])
            assert torch.allclose(ours[row], expected, atol=1e-5)


def test_rcnn_equals_one_box_at_a_time(net, image_and_boxes):
    image, boxes = image_and_boxes
    timer = StageTimer("cpu")
    ours = extract(net, image, boxes, "rcnn", ExtractSettings(rcnn_chunk=5), timer)
    assert set(timer.seconds) == {"conv", "fc"}
    with torch.inference_mode():
        pre = net.preprocess(image)
        for row, box in enumerate(boxes):
            warped = warp_regions(pre, box[None], crop=99)
            expected = net.rcnn_fc(net.pool5(net.trunk(warped)).flatten(1))[0]
            assert torch.allclose(ours[row], expected, atol=1e-5)


def test_no_boxes_and_unknown_method(net, image_and_boxes):
    image, _ = image_and_boxes
    for method in ("spp", "rcnn"):
        assert extract(net, image, np.zeros((0, 4)), method).shape == (0, net.feature_dim)
    with pytest.raises(ValueError):
        extract(net, image, np.zeros((0, 4)), "fast-rcnn")


def test_conv_maps_for_boxes_runs_only_the_scales_its_boxes_need(net, image_and_boxes):
    """The maps of the scales some box is pooled at, and windows that pool to the features of
    maps at every scale; gradients reach the trunk through the pooling."""
    image, boxes = image_and_boxes
    scales, target = (48, 96, 192, 384), 40.0
    every = conv_maps(net, image, scales, 1000)
    with torch.no_grad():
        conv, windows = conv_maps_for_boxes(net, image, boxes, scales, 1000, target)
    chosen = assign_scales(boxes, every.factors, target)
    assert conv.factors == [every.factors[k] for k in sorted(set(chosen.tolist()))]
    assert 1 < len(conv.maps) < len(scales)
    reference = spp_pool_maps(every.maps, box_windows(net, every, boxes, target), net.spp_levels)
    assert torch.allclose(spp_pool_maps(conv.maps, windows, net.spp_levels), reference,
                          atol=1e-5)
    net.zero_grad(set_to_none=True)
    conv, windows = conv_maps_for_boxes(net, image, boxes[:3], scales, 1000, target)
    spp_pool_maps(conv.maps, windows, net.spp_levels).sum().backward()
    grads = [p.grad for p in net.trunk.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    net.zero_grad(set_to_none=True)


def test_box_windows_project_each_box_on_its_own_scale(net):
    """One projection call for all boxes: the windows of projecting each box alone onto the
    map of the scale it is assigned to (8 scales, maps of different sizes, edge boxes)."""
    rng = np.random.default_rng(3)
    h, w = 230, 310
    factors = [scale_factor(h, w, s, 1600) for s in (96, 128, 176, 240, 320, 448, 640, 800)]
    maps = [torch.zeros(4, int(h * f) // 16 + 1, int(w * f) // 16 + 1) for f in factors]
    xy = rng.uniform(-5, [w, h], (500, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + rng.uniform(0, 300, (500, 2))], 1),
                         dtype=torch.float32)
    windows = box_windows(net, ConvMaps(factors, maps), boxes, 98.0)
    chosen = assign_scales(boxes, factors, 98.0)
    assert torch.equal(windows[:, 0], chosen) and len(set(chosen.tolist())) >= 6
    for i in range(len(boxes)):
        k = int(chosen[i])
        alone = project_boxes(boxes[i:i + 1] * factors[k], net.stride, net.first_centre,
                              maps[k].shape[1], maps[k].shape[2])[0]
        assert torch.equal(windows[i, 1:], alone)
    assert box_windows(net, ConvMaps(factors, maps), boxes[:0]).shape == (0, 5)
    whole = boxes.round()
    assert torch.equal(box_windows(net, ConvMaps(factors, maps), whole.long(), 98.0),
                       box_windows(net, ConvMaps(factors, maps), whole, 98.0))
