"""SPP pooling against AdaptiveMaxPool2d, and box projection on hand-worked boxes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detection.spp import (FEW_WINDOWS, SpatialPyramidPool, project_boxes, spp_output_size,
                          spp_pool, spp_pool_batch, spp_pool_maps)


def reference_spp(fmap, windows, levels):
    """The obvious version: crop each window and run AdaptiveMaxPool2d per level."""
    rows = []
    for x1, y1, x2, y2 in windows.tolist():
        crop = fmap[:, y1:y2 + 1, x1:x2 + 1]
        rows.append(torch.cat([torch.flatten(nn.AdaptiveMaxPool2d(n)(crop), 0) for n in levels]))
    return torch.stack(rows)


def random_windows(generator, height, width, count):
    x = torch.sort(torch.randint(0, width, (count, 2), generator=generator), dim=1).values
    y = torch.sort(torch.randint(0, height, (count, 2), generator=generator), dim=1).values
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


@pytest.mark.parametrize("levels", [(1, 2, 3, 6), (6, 3, 2, 1), (1, 2, 4), (7, 3, 2, 1), (5,)])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("count", [200, FEW_WINDOWS])      # the table, and roi_pool for a few
def test_matches_adaptive_max_pool_on_random_maps_and_windows(levels, seed, count):
    g = torch.Generator().manual_seed(seed)
    height, width = (23, 31) if seed == 0 else (9, 40)
    fmap = torch.randn(8, height, width, generator=g)
    windows = random_windows(g, height, width, count)
    windows[:5] = torch.tensor([[0, 0, 0, 0], [width - 1, height - 1, width - 1, height - 1],
                                [3, 4, 3, 4], [0, 0, width - 1, height - 1], [2, 1, 2, 7]])
    ours = spp_pool(fmap, windows, levels)
    assert ours.shape == (count, spp_output_size(8, levels))
    assert torch.equal(ours, reference_spp(fmap, windows, levels))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_windows_of_several_maps_pool_as_each_map_alone(dtype):
    """One call over maps of different sizes (side by side on a zero canvas; negative values
    show any read of the padding, and a read of a neighbouring map breaks the equality) gives
    each window exactly its own map's bins, in the given order."""
    g = torch.Generator().manual_seed(5)
    sizes = [(7, 9), (12, 5), (3, 14), (10, 10)]
    fmaps = [(torch.randn(6, h, w, generator=g) - 5).to(dtype) for h, w in sizes]
    windows = torch.cat([torch.cat([torch.full((8, 1), k), random_windows(g, h, w, 8)], dim=1)
                         for k, (h, w) in enumerate(sizes)])
    order = torch.randperm(len(windows), generator=g)
    windows = windows[order]
    ours = spp_pool_maps(fmaps, windows, (1, 2, 3, 6))
    expected = torch.cat([spp_pool(fmaps[int(k)].float(), w[None], (1, 2, 3, 6))
                          for k, w in zip(windows[:, 0], windows[:, 1:])])
    assert ours.dtype == torch.float32 and torch.equal(ours, expected)
    assert ours.max() < 0                           # never the zeros of the padding


def test_one_window_per_map_of_a_batch_pools_as_that_map_alone_and_passes_gradients():
    """`spp_pool_batch` (pre-training's crops, each with its own box) gives window i the bins of
    map i, and the gradient reaches exactly the cells that are some bin's maximum."""
    g = torch.Generator().manual_seed(7)
    maps = (torch.randn(5, 4, 8, 9, generator=g) - 3).requires_grad_()
    windows = random_windows(g, 8, 9, 5)
    windows[0] = torch.tensor([0, 0, 8, 7])
    pooled = spp_pool_batch(maps, windows, (1, 2, 3, 6))
    expected = torch.cat([reference_spp(maps[i].detach(), windows[i:i + 1], (1, 2, 3, 6))
                          for i in range(5)])
    assert torch.equal(pooled.detach(), expected)
    pooled.sum().backward()
    touched = maps.grad != 0
    assert touched.any() and maps.grad.min() >= 0
    for i, (x1, y1, x2, y2) in enumerate(windows.tolist()):
        inside = torch.zeros(4, 8, 9, dtype=torch.bool)
        inside[:, y1:y2 + 1, x1:x2 + 1] = True
        assert not touched[i][~inside].any()        # nothing outside the window, nor other maps


def test_one_cell_windows_repeat_the_cell():
    fmap = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(2, 4, 5)
    out = spp_pool(fmap, torch.tensor([[3, 2, 3, 2]]), (1, 2))
    assert out.tolist() == [[fmap[0, 2, 3].item(), fmap[1, 2, 3].item()]
                            + [fmap[0, 2, 3].item()] * 4 + [fmap[1, 2, 3].item()] * 4]


def test_windows_in_part_of_a_map_never_read_outside_it():
    """A few windows in one region (a fine-tuning sample at a large scale): the table is built
    over their bounding region only, and cells outside it (here larger than any inside) must not
    leak into the bins."""
    g = torch.Generator().manual_seed(3)
    fmap = torch.full((4, 30, 40), 100.0)
    fmap[:, 5:17, 8:25] = torch.randn(4, 12, 17, generator=g)
    windows = random_windows(g, 12, 17, 3 * FEW_WINDOWS) + torch.tensor([8, 5, 8, 5])
    ours = spp_pool(fmap, windows, (1, 2, 3, 6))
    assert ours.max() < 100
    assert torch.equal(ours, reference_spp(fmap, windows, (1, 2, 3, 6)))


def test_module_and_empty_input():
    pool = SpatialPyramidPool()
    assert pool.output_size(256) == 12800
    assert pool(torch.randn(4, 5, 5), torch.zeros((0, 4), dtype=torch.long)).shape == (0, 200)


def test_projection_hand_worked_zf5():
    # ZF-5: stride 16, first receptive-field centre at pixel 20 (0-based), shrink 6.5 px.
    boxes = torch.tensor([[0.0, 0.0, 223.0, 223.0],      # a 224 px box at the origin
                          [100.0, 50.0, 300.0, 120.0],
                          [40.0, 40.0, 45.0, 45.0],      # tiny: inverted, collapses to its middle
                          [-50.0, -50.0, 2000.0, 900.0]])  # clamped to the map
    cells = project_boxes(boxes, stride=16, first_centre=20, map_height=30, map_width=40)
    # x1=0: floor((0-20+6.5)/16+0.5)=floor(-0.34375)=-1 -> 0; x2=223: ceil((223-26.5)/16-0.5)=12
    assert cells[0].tolist() == [0, 0, 12, 12]
    # x1=100: floor(86.5/16+0.5)=floor(5.906)=5; y1=50: floor(36.5/16+0.5)=floor(2.78)=2
    # x2=300: ceil(273.5/16-0.5)=ceil(16.59)=17; y2=120: ceil(93.5/16-0.5)=ceil(5.34)=6
    assert cells[1].tolist() == [5, 2, 17, 6]
    # x1=40: floor(26.5/16+0.5)=2; x2=45: ceil(18.5/16-0.5)=ceil(0.656)=1 -> inverted, middle 1
    assert cells[2].tolist() == [1, 1, 1, 1]
    assert cells[3].tolist() == [0, 0, 39, 29]


def test_projection_matches_original_one_based_formula():
    # original: left = floor((X1 - 21 + 6.5)/16 + 0.5) + 1 with 1-based pixels and cells
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 600
    boxes = torch.cat([xy, xy + 40 + torch.rand(500, 2, generator=g) * 300], dim=1)
    cells = project_boxes(boxes, 16, 20, 1000, 1000)
    one_based = boxes + 1
    left = (torch.floor((one_based[:, :2] - 21 + 6.5) / 16 + 0.5) + 1).clamp(min=1)
    right = torch.ceil((one_based[:, 2:] - 21 - 6.5) / 16 - 0.5) + 1
    ok = (left <= right).all(dim=1)
    assert torch.equal(cells[ok, :2] + 1, left[ok].long())
    assert torch.equal(cells[ok, 2:] + 1, right[ok].long())
