"""Pre-training regions and their crops: real context around the box for the SPP head, and the
same pixels whether the crops are held in memory or cut per minibatch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from detection.backbones import build_net
from detection.pretrain_crops import (aspect_context_squares, context_box_side, context_margin,
                                      pretrain_crops)
from detection.regions import label_regions
from detection.train import TrainImage, TrainSettings, box_window, crop_windows

SETTINGS = TrainSettings(pretrain_jitters=3, pretrain_background=5)


def _net():
    return build_net("zf5_small", None, crop_size=64, seed=0)


def _images(draw, count: int = 3) -> list[TrainImage]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        pixels, voc_boxes = draw(i)
        gt = torch.tensor(voc_boxes, dtype=torch.float32) - 1
        xy = rng.uniform(0, [150, 100], (20, 2))
        proposals = np.concatenate([xy, xy + rng.uniform(15, 60, (20, 2))], axis=1)
        regions = label_regions(proposals, gt, torch.ones(len(gt), dtype=torch.int64), 1)
        out.append(TrainImage(f"img{i}", pixels, regions))
    return out


def test_crops_for_the_spp_head_keep_real_context_around_the_box():
    """Each region is cut twice: R-CNN's warp, and a crop with the box in the middle and real
    image content (not padding) around it, as SPP-net's test sees a box inside the image."""
    pixels = np.full((120, 160, 3), 40, dtype=np.uint8)           # dark background
    pixels[40:80, 60:100] = 220                                   # a bright 40 x 40 object
    gt = torch.tensor([[60.0, 40.0, 99.0, 79.0]])
    regions = label_regions(np.zeros((0, 4)), gt, torch.ones(1, dtype=torch.int64), 1)
    net = _net()
    settings = TrainSettings(pretrain_jitters=0, pretrain_background=0)
    crops = pretrain_crops(net, [TrainImage("a", pixels, regions)], settings,
                           np.random.default_rng(0))
    warps, context = crops.batch(torch.tensor([0])), crops.batch(torch.tensor([0]), True)
    assert crops.labels.tolist() == [1] and warps.shape[-1] == net.crop_size
    box = context_box_side(net.crop_size)
    margin = context_margin(box, settings.pretrain_context)
    assert context.shape[-1] == box + 2 * margin and margin > 0
    c = context[0, 0]
    inside, outside = c[margin + 2:-margin - 2, margin + 2:-margin - 2], c[:margin - 2, :]
    assert inside.min() > outside.max()                  # the object fills the middle
    assert outside.std() < 1e-3 and outside.abs().max() > 0.1   # background pixels, not zeros
    window = box_window(net, context.shape[-1], margin)
    cells = window[2] - window[0] + 1
    assert window[0] == window[1] and 0 < cells < box // net.stride + 2


def test_aspect_crops_show_each_box_with_its_shape_at_the_test_scale():
    """With `pretrain_aspect` the context crop scales the image evenly, so that the box's area
    is `box_side`**2 as at the scale SPP-net's test pools it at, and centres it; `places` says
    where it is. A long box is shrunk to leave half the margin around it."""
    pixels = np.full((150, 200, 3), 40, dtype=np.uint8)
    pixels[50:90, 40:100] = 220                                   # a bright 60 x 40 object
    gt = torch.tensor([[40.0, 50.0, 99.0, 89.0]])
    regions = label_regions(np.zeros((0, 4)), gt, torch.ones(1, dtype=torch.int64), 1)
    settings = TrainSettings(pretrain_jitters=0, pretrain_background=0, pretrain_aspect=True)
    crops = pretrain_crops(_net(), [TrainImage("a", pixels, regions)], settings,
                           np.random.default_rng(0))
    side, box = crops.context_side, crops.box_side
    x1, y1, x2, y2 = crops.places[0].tolist()
    assert (x2 - x1) / (y2 - y1) == pytest.approx(1.5)             # the object's own shape
    assert x1 + x2 == pytest.approx(side) and y1 + y2 == pytest.approx(side)
    assert (x2 - x1) * (y2 - y1) == pytest.approx(box ** 2, rel=1e-4)
    c = crops.batch(torch.tensor([0]), context=True)[0, 0]
    bright = torch.nonzero(c > c.min() + 0.5 * (c.max() - c.min()))
    assert bright[:, 1].min() == pytest.approx(x1, abs=1) and bright[:, 1].max() + 1 == \
        pytest.approx(x2, abs=1)
    assert bright[:, 0].min() == pytest.approx(y1, abs=1) and bright[:, 0].max() + 1 == \
        pytest.approx(y2, abs=1)
    squares, places = aspect_context_squares(torch.tensor([[0.0, 0.0, 399.0, 9.0]]), box, side)
    margin = (side - box) / 2
    assert places[0, 2] - places[0, 0] == pytest.approx(box + margin)   # 40:1, shrunk to fit
    assert squares[0, 2] - squares[0, 0] + 1 == pytest.approx(400 * side / (box + margin))


def test_aspect_crop_windows_follow_the_box_when_resized_and_flipped():
    """The conv5 window of each crop's box: as `box_window` for a centred square box, and
    mirrored with the crop."""
    net = _net()
    settings = TrainSettings(pretrain_jitters=0, pretrain_background=0)
    pixels = np.zeros((100, 100, 3), dtype=np.uint8)
    gt = torch.tensor([[20.0, 20.0, 59.0, 59.0]])
    regions = label_regions(np.zeros((0, 4)), gt, torch.ones(1, dtype=torch.int64), 1)
    square = pretrain_crops(net, [TrainImage("a", pixels, regions)], settings,
                            np.random.default_rng(0))
    side = square.context_side
    assert crop_windows(net, square, torch.tensor([0]), side, False)[0].tolist() == \
        box_window(net, side, square.margin)
    square.places = torch.tensor([[10.0, 40.0, 60.0, 70.0]])     # a wide box, off centre
    plain = crop_windows(net, square, torch.tensor([0]), side, False)[0]
    flipped = crop_windows(net, square, torch.tensor([0]), side, True)[0]
    cells = plain.new_tensor(box_window(net, side, 0)[2])        # last cell of the map
    assert flipped.tolist() == [cells - plain[2], plain[1], cells - plain[0], plain[3]]


def test_crops_cut_per_minibatch_equal_the_crops_held_in_memory(draw):
    """Over the memory budget only the boxes are kept; any minibatch, regions of several images
    in any order, gets the same pixels as from the crops cut once."""
    images = _images(draw)
    held = pretrain_crops(_net(), images, SETTINGS, np.random.default_rng(1))
    cut = pretrain_crops(_net(), images, TrainSettings(pretrain_jitters=3, pretrain_background=5,
                                                       pretrain_crop_memory=0.0),
                         np.random.default_rng(1))
    assert held.in_memory and not cut.in_memory and cut._crops is None
    assert torch.equal(held.labels, cut.labels) and len(set(held.image_index.tolist())) == 3
    assert held.nbytes() == len(held) * 3 * (64 ** 2 + held.context_side ** 2) * 2
    idx = torch.randperm(len(held), generator=torch.Generator().manual_seed(0))[:17]
    for context in (False, True):
        assert torch.equal(held.batch(idx, context), cut.batch(idx, context))


def test_only_the_crops_asked_for_are_cut_and_they_match_the_per_minibatch_cut(draw):
    """A draw cuts nothing until a crop is needed; `cut` cuts exactly the crops it is given,
    across images and out of order, with the pixels of the per-minibatch path."""
    images = _images(draw)
    held = pretrain_crops(_net(), images, SETTINGS, np.random.default_rng(2))
    cut = pretrain_crops(_net(), images, replace(SETTINGS, pretrain_crop_memory=0.0),
                         np.random.default_rng(2))
    assert held.in_memory and not held._ready.any()
    order = torch.randperm(len(held), generator=torch.Generator().manual_seed(1))
    warps, contexts = order[:len(held) // 2], order[len(held) // 2:][:5]
    held.cut(warps, contexts)
    assert held._ready[0].sum() == len(warps) and held._ready[0, warps].all()
    assert held._ready[1].sum() == len(contexts) and held._ready[1, contexts].all()
    assert torch.equal(held._crops[warps].float(), cut.batch(warps))
    assert torch.equal(held._context[contexts].float(), cut.batch(contexts, True))
    held.cut(warps, contexts)                       # already there: nothing is cut again
    assert held._ready.sum() == len(warps) + len(contexts)
    rest = order[len(held) // 2:]                   # a batch cuts what it lacks
    assert torch.equal(held.batch(rest, True), cut.batch(rest, True))


def test_regions_are_ground_truth_jittered_copies_and_background(draw):
    images = _images(draw, 1)
    crops = pretrain_crops(_net(), images, SETTINGS, np.random.default_rng(0))
    regions = images[0].regions
    objects = int((regions.gt_class > 0).sum())
    assert torch.equal(crops.boxes[:objects], regions.boxes[regions.gt_class > 0])
    assert (crops.labels[:objects] == 1).all()
    background = int((crops.labels == 0).sum())
    assert 0 < background <= SETTINGS.pretrain_background
    assert objects < len(crops) - background <= objects * (1 + SETTINGS.pretrain_jitters)
