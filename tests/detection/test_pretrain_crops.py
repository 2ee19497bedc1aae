"""Pre-training regions and their crops: real context around the box for the SPP head, and the
same pixels whether the crops are held in memory or cut per minibatch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from detection.backbones import build_net
from detection.pretrain_crops import context_box_side, context_margin, pretrain_crops
from detection.regions import label_regions
from detection.train import TrainImage, TrainSettings, box_window

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
