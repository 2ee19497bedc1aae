"""R-CNN warp against a reference crop and resize of the same region."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torchvision.ops import roi_align

from detection.rcnn_warp import context_boxes, warp_images, warp_regions


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


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_warps_spread_over_threads_equal_one_call_per_image(threads):
    """Images and parts of an image's boxes warped on several threads give, in order, exactly
    what one roi_align call per image gives."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 3, h, w, generator=g) for h, w in ((120, 90), (60, 200), (75, 75))]
    pairs = []
    for image, n in zip(images, (100, 5, 70)):
        h, w = image.shape[-2:]
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 10, h - 10])
        wh = 2 + torch.rand(n, 2, generator=g) * torch.tensor([w, h])
        pairs.append((image, torch.cat([xy, (xy + wh).minimum(torch.tensor([w - 1, h - 1]))], 1)))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = warp_images(pairs, 33)
        single = warp_regions(*pairs[0], 33)
    finally:
        torch.set_num_threads(before)
    expected = [roi_align(image, torch.cat([torch.zeros(len(b), 1), context_boxes(b, 33)], 1),
                          (33, 33), 1.0, -1, True) for image, b in pairs]
    assert torch.equal(ours, torch.cat(expected))
    assert torch.equal(single, expected[0])
