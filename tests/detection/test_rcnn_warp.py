"""R-CNN warp against a reference crop and resize of the same region."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torchvision.ops import roi_align

from detection.rcnn_warp import context_boxes, pyramid_levels, warp_images, warp_regions


def test_context_is_16_of_227_pixels():
    # a 195 px box plus 16 px each side at scale 1 is exactly 227 px
    regions = context_boxes(torch.tensor([[100.0, 50.0, 294.0, 244.0]]), crop=227)
    assert regions.tolist() == [[84.0, 34.0, 311.0, 261.0]]


def test_identity_warp_equals_the_crop():
    image = torch.randn(1, 3, 300, 400)
    box = torch.tensor([[100.0, 50.0, 294.0, 244.0]])   # region 84..310 x 34..260, 227 px
    warped = warp_regions(image, box, crop=227)
    assert torch.allclose(warped[0], image[0, :, 34:261, 84:311], atol=1e-5)


def test_shrinking_by_two_averages_2x2_blocks():
    image = torch.randn(1, 3, 600, 600)
    box = torch.tensor([[132.0, 132.0, 521.0, 521.0]])   # 390 px + 32 px context = 454 px
    warped = warp_regions(image, box, crop=227)
    reference = F.avg_pool2d(image[:, :, 100:554, 100:554], 2)
    assert torch.allclose(warped, reference, atol=1e-5)


def test_enlarging_is_bilinear_resize_of_the_region():
    image = torch.randn(1, 3, 200, 200)
    box = torch.tensor([[48.0, 60.0, 87.0, 99.0]])       # 40 px: grown by 40*16/195 px
    region = context_boxes(box, crop=227)[0]
    warped = warp_regions(image, box, crop=227)
    # reference: bilinear sampling of the continuous region at the output pixel centres
    steps = (torch.arange(227) + 0.5) / 227
    xs = region[0] + steps * (region[2] - region[0])
    ys = region[1] + steps * (region[3] - region[1])
    grid = torch.stack(torch.meshgrid((ys + 0.0) / 200 * 2 - 1, (xs + 0.0) / 200 * 2 - 1,
                                      indexing="ij")[::-1], dim=-1)[None]
    reference = F.grid_sample(image, grid, mode="bilinear", align_corners=False)
    assert torch.allclose(warped, reference, atol=1e-4)


def test_outside_the_image_is_zero_the_mean_pixel():
    image = torch.ones(1, 3, 100, 100)
    warped = warp_regions(image, torch.tensor([[0.0, 0.0, 19.0, 19.0]]), crop=227)
    assert warped[0, :, 0, 0].abs().max() == 0          # far outside: the (zero) mean
    assert torch.allclose(warped[0, :, 113, 113], torch.ones(3))


def test_pyramid_level_is_the_largest_with_the_region_at_least_the_crop():
    side = torch.tensor([50.0, 99.0, 197.0, 198.0, 395.0, 396.0, 1000.0])
    regions = torch.stack([torch.zeros(7), torch.zeros(7), side, side], dim=1)
    assert pyramid_levels(regions, 99).tolist() == [0, 0, 0, 1, 1, 2, 3]
    # the less shrunk axis decides: a thin region keeps its detail across
    assert pyramid_levels(torch.tensor([[0.0, 0.0, 1000.0, 120.0]]), 99).tolist() == [0]


def test_shrinking_by_four_averages_4x4_blocks():
    image = torch.randn(1, 3, 520, 520)
    box = torch.tensor([[64.0, 64.0, 459.0, 459.0]])     # 396 px = 4 x 99, no context
    assert context_boxes(box, crop=99, context=0.0).tolist() == [[64.0, 64.0, 460.0, 460.0]]
    warped = warp_regions(image, box, crop=99, context=0.0)
    reference = F.avg_pool2d(image[:, :, 64:460, 64:460], 4)
    assert torch.allclose(warped, reference, atol=1e-5)


@pytest.mark.parametrize("shrink", [2.5, 3.5, 6.3])
def test_large_shrinks_are_antialiased(shrink):
    """Warped white noise keeps about the variance of a mean over the shrink's area (1/shrink^2
    of the pixels'), neither aliased (bilinear samples alone keep about half of it) nor blurred
    much further."""
    g = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 700, 700, generator=g)
    side = 64 * shrink
    boxes = torch.tensor([[10.0 + 7 * k, 20.0 + 5 * k, 10 + 7 * k + side, 20 + 5 * k + side]
                          for k in range(8)])
    warped = warp_regions(image, boxes, crop=64, context=0.0)
    assert warped.shape == (8, 3, 64, 64)
    assert 0.25 / shrink ** 2 < warped.var().item() < 2.0 / shrink ** 2
    aliased = roi_align(image, torch.cat([torch.zeros(8, 1), context_boxes(boxes, 64, 0.0)], 1),
                        (64, 64), 1.0, 1, True)
    assert aliased.var().item() > 0.3


def test_a_flat_image_stays_flat_at_every_level():
    image = torch.full((1, 3, 301, 257), 0.7)          # odd sides: the last blocks are partial
    boxes = torch.tensor([[0.0, 0.0, 256.0, 300.0], [3.0, 5.0, 250.0, 290.0],
                          [100.0, 100.0, 140.0, 150.0]])
    warped = warp_regions(image, boxes, crop=31, context=0.0)
    assert torch.allclose(warped, torch.full_like(warped, 0.7), atol=1e-6)


def test_no_boxes_give_an_empty_batch():
    image = torch.randn(1, 3, 40, 50)
    assert warp_regions(image, torch.zeros((0, 4)), crop=17).shape == (0, 3, 17, 17)


def _random_pairs(g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images = [torch.randn(1, 3, h, w, generator=g) for h, w in ((120, 90), (60, 200), (75, 75))]
    pairs = []
    for image, n in zip(images, (100, 5, 70)):
        h, w = image.shape[-2:]
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 10, h - 10])
        wh = 2 + torch.rand(n, 2, generator=g) * torch.tensor([w, h])
        pairs.append((image, torch.cat([xy, (xy + wh).minimum(torch.tensor([w - 1, h - 1]))], 1)))
    return pairs


@pytest.mark.parametrize("threads", [2, 3])
def test_warps_spread_over_threads_equal_one_thread(threads):
    """Images, pyramid levels and parts of an image's boxes warped on several threads give, in
    order, exactly what one thread gives, image by image."""
    pairs = _random_pairs(torch.Generator().manual_seed(0))
    assert len(set(pyramid_levels(context_boxes(pairs[0][1], 33), 33).tolist())) > 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = [warp_regions(image, boxes, 33) for image, boxes in pairs]
        torch.set_num_threads(threads)
        ours = warp_images(pairs, 33)
        single = warp_regions(*pairs[0], 33)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(ours, torch.cat(expected))
    assert torch.equal(single, expected[0])


def test_regions_under_twice_the_crop_are_one_roi_align_call():
    """Up to a 2x shrink the warp is torchvision's roi_align with adaptive sampling, unchanged."""
    image, boxes = _random_pairs(torch.Generator().manual_seed(3))[0]
    regions = context_boxes(boxes, 33)
    small = pyramid_levels(regions, 33) == 0
    expected = roi_align(image, torch.cat([torch.zeros(int(small.sum()), 1), regions[small]], 1),
                         (33, 33), 1.0, -1, True)
    assert torch.equal(warp_regions(image, boxes[small], 33), expected)
