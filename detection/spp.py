"""Spatial pyramid pooling of many windows of one feature map, and the projection of image boxes
onto that map (SPP-net, He et al. 2014, appendix).

Pooling. A window of `w x h` cells is split, per pyramid level `n`, into `n x n` bins; bin `i` spans
cells `[floor(i*w/n), ceil((i+1)*w/n))` (never empty), exactly as `nn.AdaptiveMaxPool2d(n)` does on
the cropped window. All windows are pooled in one vectorised step with a 2-D sparse table of range
maxima (the max over `2^kx x 2^ky` cells at every position): the max of any bin is the max of four
table entries, gathered for every window and bin at once. When every level divides the finest one
(the paper's {1, 2, 3, 6}), the coarser levels are exact maxima over blocks of the finest bins.
On a GPU the same bins come from `torchvision.ops.roi_pool` at the finest level (measured: the
table's many small kernels made pooling the slowest SPP-net stage on an H200).

Flattening order: levels in the order given; within a level, channel-major then row then column,
i.e. `torch.flatten(AdaptiveMaxPool2d(n)(crop), 0)` for each level, concatenated. With a single
level of 6 that is AlexNet's pool5 layout, so pretrained fc6 weights line up with it.

Projection. A box in pixels of the (scaled) image maps to the cells whose receptive-field centres
lie inside it, shrunk a little (the original code's rule for ZF-5, stride 16, first centre at pixel
20 (0-based), shrink 6.5 px): `left = floor((x1 - c0 + d) / S + 0.5)`,
`right = ceil((x2 - c0 - d) / S - 0.5)`, the same for y; an inverted window collapses to its middle
cell; the result is clamped to the map. For other trunks `S` and `c0` come from the architecture and
`d` is `6.5 / 16` of the stride.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

SPP_LEVELS: tuple[int, ...] = (1, 2, 3, 6)
SHRINK_FRACTION = 6.5 / 16


def spp_output_size(channels: int, levels: Sequence[int] = SPP_LEVELS) -> int:
    """Length of one pooled vector: `channels * sum(n * n for n in levels)`."""
    return channels * sum(n * n for n in levels)


def project_boxes(boxes: Tensor, stride: float, first_centre: float, map_height: int | Tensor,
                  map_width: int | Tensor, shrink: float | None = None) -> Tensor:
    """Project boxes `[N, 4]` (0-based pixel xyxy in the image the map was computed on) onto the
    feature map; returns int64 cell windows `[N, 4]` `(x1, y1, x2, y2)`, inclusive, never empty.
    The map size may be given per box (`[N]` tensors: each box on its own scale's map)."""
    if shrink is None:
        shrink = SHRINK_FRACTION * stride
    b = boxes.to(torch.float64)
    lo = torch.floor((b[:, :2] - first_centre + shrink) / stride + 0.5)
    hi = torch.ceil((b[:, 2:] - first_centre - shrink) / stride - 0.5)
    middle = torch.floor((lo + hi) / 2)
    inverted = lo > hi
    lo = torch.where(inverted, middle, lo)
    hi = torch.where(inverted, middle, hi)
    if isinstance(map_height, Tensor):
        limit = torch.stack([map_width, map_height], 1).to(b.device, torch.float64) - 1
    else:
        limit = torch.tensor([map_width - 1, map_height - 1], dtype=torch.float64,
                             device=b.device)
    lo = torch.minimum(lo.clamp(min=0), limit)
    hi = torch.minimum(hi.clamp(min=0), limit)
    return torch.cat([lo, hi], dim=1).to(torch.int64)


def _floor_log2(n: Tensor) -> Tensor:
    """floor(log2(n)) for positive int64 tensors, exactly."""
    k = torch.floor(torch.log2(n.to(torch.float64))).to(torch.int64)
    k = k - ((1 << k) > n).to(torch.int64)           # guard against rounding up
    return k + ((1 << (k + 1)) <= n).to(torch.int64)  # and down


def _bins(start: Tensor, length: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Bin edges `[N, n]` of windows starting at `start` with `length` cells, split in `n`."""
    i = torch.arange(n, device=start.device)
    lo = (i[None] * length[:, None]) // n
    hi = -((-(i[None] + 1) * length[:, None]) // n)
    return start[:, None] + lo, start[:, None] + hi


class _RangeMaxTable:
    """2-D sparse table over a `[C, H, W]` map: entry `(ky, kx, y, x)` holds the channel-wise max
    over rows `y .. y + 2^ky - 1` and columns `x .. x + 2^kx - 1` (channels last)."""

    def __init__(self, fmap: Tensor, levels_y: int, levels_x: int) -> None:
        base = fmap.permute(1, 2, 0).contiguous()            # [H, W, C]
        height, width, channels = base.shape
        along_x = [base]
        for k in range(1, levels_x):
            prev, step = along_x[-1], 1 << (k - 1)
            cur = prev.clone()
            cur[:, : width - step] = torch.maximum(prev[:, : width - step], prev[:, step:])
            along_x.append(cur)
        rows = []
        for ky in range(levels_y):
            if ky == 0:
                rows.append(along_x)
                continue
            step = 1 << (ky - 1)
            level = []
            for prev in rows[-1]:
                cur = prev.clone()
                cur[: height - step] = torch.maximum(prev[: height - step], prev[step:])
                level.append(cur)
            rows.append(level)
        self.table = torch.stack([torch.stack(r) for r in rows]).reshape(-1, channels)
        self.levels_x, self.height, self.width = levels_x, height, width

    def max(self, y0: Tensor, y1: Tensor, x0: Tensor, x1: Tensor) -> Tensor:
        """Max over rows `[y0, y1)` and columns `[x0, x1)` (any equal shapes, non-empty ranges);
        returns `[*shape, C]`."""
        ky, kx = _floor_log2(y1 - y0), _floor_log2(x1 - x0)
        ya, yb = y0, y1 - (1 << ky)
        xa, xb = x0, x1 - (1 << kx)
        plane = (ky * self.levels_x + kx) * self.height

        def rows(y: Tensor, x: Tensor) -> Tensor:
            index = ((plane + y) * self.width + x).reshape(-1)
            return self.table.index_select(0, index)

        out = torch.maximum(torch.maximum(rows(ya, xa), rows(ya, xb)),
                            torch.maximum(rows(yb, xa), rows(yb, xb)))
        return out.reshape(*y0.shape, -1)


def _pool_level(table: _RangeMaxTable, windows: Tensor, n: int) -> Tensor:
    """Pool every window into `n x n` bins, channels last: `[N, n, n, C]`."""
    width = windows[:, 2] - windows[:, 0] + 1
    height = windows[:, 3] - windows[:, 1] + 1
    x0, x1 = _bins(windows[:, 0], width, n)                     # [N, n]
    y0, y1 = _bins(windows[:, 1], height, n)
    shape = (len(windows), n, n)
    return table.max(y0[:, :, None].expand(shape), y1[:, :, None].expand(shape),
                     x0[:, None, :].expand(shape), x1[:, None, :].expand(shape))


def _coarsen(fine: Tensor, n: int) -> Tensor:
    """`[N, m, m, C]` bins -> `[N, n, n, C]` for `n` dividing `m`: each coarse bin is the max of
    a block of fine bins, taken as elementwise maxima of strided slices (far faster on a CPU
    than a reduction over non-contiguous dimensions)."""
    block = fine.shape[1] // n
    view = fine.view(len(fine), n, block, n, block, fine.shape[-1])
    out = view[:, :, 0, :, 0]
    for i in range(block):
        for j in range(block):
            if i or j:
                out = torch.maximum(out, view[:, :, i, :, j])
    return out


# below this many windows the CPU pools with roi_pool: measured on this project's 2-core CPU,
# 128-channel maps of 20x23 to 60x68 cells: 8 windows 0.9-1.4 ms against 2.2-3.3 ms for the
# table, 16 windows 1.5-1.8 against 3.5-5.0 ms; from about 32 windows on the table is faster
FEW_WINDOWS = 16


def spp_pool(fmap: Tensor, windows: Tensor, levels: Sequence[int] = SPP_LEVELS,
             chunk: int = 128) -> Tensor:
    """Spatial pyramid max pooling of many windows of one feature map.

    `fmap` is `[C, H, W]`; `windows` is int64 `[N, 4]` inclusive cell boxes `(x1, y1, x2, y2)`
    inside the map (as `project_boxes` returns). Returns `[N, C * sum(n*n)]` in the documented
    flattening order; each level equals `AdaptiveMaxPool2d(n)` on the window's crop. Windows are
    gathered `chunk` at a time so that intermediates stay small (large temporaries cost page
    faults on every call on a CPU). A GPU, and a CPU with at most `FEW_WINDOWS` windows (a
    fine-tuning sample's share of one scale), use `torchvision.ops.roi_pool` instead: the same
    bins, without the table's fixed cost.
    """
    levels = tuple(int(n) for n in levels)
    channels = fmap.shape[0]
    out = fmap.new_empty((len(windows), spp_output_size(channels, levels)))
    if len(windows) == 0:
        return out
    windows = windows.to(device=fmap.device, dtype=torch.int64)
    few = len(windows) <= FEW_WINDOWS and fmap.dtype in (torch.float32, torch.float64)
    if fmap.device.type != "cpu" or few:         # (the CPU roi_pool has no fp16/bf16 kernel)
        return _roi_pool_levels(fmap, windows, levels)
    # the table only needs the cells some window covers: a few windows of a large map (a
    # fine-tuning sample) build it over their bounding region, not the whole map
    low = windows[:, :2].amin(dim=0)
    high = windows[:, 2:].amax(dim=0)
    x0, y0, x1, y1 = int(low[0]), int(low[1]), int(high[0]), int(high[1])
    if (x1 - x0 + 1) * (y1 - y0 + 1) < fmap.shape[1] * fmap.shape[2]:
        fmap = fmap[:, y0:y1 + 1, x0:x1 + 1]
        windows = windows - torch.tensor([x0, y0, x0, y0], device=windows.device)
    finest = max(levels)
    nested = all(finest % n == 0 for n in levels)
    pooled_levels = (finest,) if nested else levels
    # the widest bin any level asks for decides how many table levels are needed
    longest = torch.stack([windows[:, 2] - windows[:, 0], windows[:, 3] - windows[:, 1]]) + 1
    widest_bin = -(-longest.amax(dim=1) // min(pooled_levels)) + 1          # [x, y]
    table = _RangeMaxTable(fmap, int(widest_bin[1]).bit_length(), int(widest_bin[0]).bit_length())
    offsets, offset = {}, 0
    for n in levels:
        offsets[n], offset = offset, offset + channels * n * n
    for start in range(0, len(windows), chunk):
        part = windows[start:start + chunk]
        rows = out[start:start + chunk]
        pooled = {n: _pool_level(table, part, n) for n in pooled_levels}   # channels last
        for n in sorted(levels, reverse=True):
            if n not in pooled:        # nested: from the finest computed level it divides
                source = min(m for m in pooled if m % n == 0)
                pooled[n] = _coarsen(pooled[source], n)
            target = rows[:, offsets[n]:offsets[n] + channels * n * n]
            target.view(len(part), channels, n, n).copy_(pooled[n].permute(0, 3, 1, 2))
    return out


def _roi_pool_levels(fmap: Tensor, windows: Tensor, levels: tuple[int, ...]) -> Tensor:
    """The same pooling through `torchvision.ops.roi_pool` (`_roi_pool_batch`). With integer
    cell windows inside the map and `spatial_scale=1` its bins are exactly the adaptive ones
    (`floor(i*L/n)` to `ceil((i+1)*L/n)`). On a GPU this is far faster than the sparse table's
    many small kernels; on a CPU it is slower (0.72 s against 0.19 s for 2000 windows of a
    256 x 43 x 58 map), so the CPU keeps the table."""
    rois = torch.cat([windows.new_zeros((len(windows), 1)), windows], dim=1)
    return _roi_pool_batch(fmap[None], rois, levels)


def _roi_pool_batch(batch: Tensor, rois: Tensor, levels: tuple[int, ...]) -> Tensor:
    """`roi_pool` of rows `(map index, x1, y1, x2, y2)` of a batch of maps: `[N, C * sum(n*n)]`.
    When every level divides the finest (the paper's {1, 2, 3, 6}) one call pools the finest
    level and the coarser ones are maxima over blocks of its bins, as in `spp_pool` (exact: a
    coarse bin is the union of the fine bins it covers); else one call per level. Each call
    reads every cell of every window, so this reads them once instead of once per level."""
    from torchvision.ops import roi_pool

    rois = rois.to(device=batch.device, dtype=batch.dtype)
    finest = max(levels)
    if any(finest % n for n in levels):
        return torch.cat([roi_pool(batch, rois, n, 1.0).flatten(1) for n in levels], dim=1)
    fine = roi_pool(batch, rois, finest, 1.0).permute(0, 2, 3, 1).contiguous()   # [N, m, m, C]
    return torch.cat([(fine if n == finest else _coarsen(fine, n)).permute(0, 3, 1, 2).flatten(1)
                      for n in levels], dim=1)


def spp_pool_batch(maps: Tensor, windows: Tensor, levels: Sequence[int] = SPP_LEVELS) -> Tensor:
    """Pyramid-pool one window of each map of a batch: `maps` `[B, C, H, W]`, `windows` int64
    `[B, 4]` cell boxes inside the maps (window i of map i). `[B, C * sum(n*n)]`, differentiable
    (pre-training pools each crop's box this way)."""
    rois = torch.cat([torch.arange(len(windows), device=windows.device)[:, None], windows], 1)
    return _roi_pool_batch(maps, rois, tuple(int(n) for n in levels))


def spp_pool_maps(fmaps: Sequence[Tensor], windows: Tensor,
                  levels: Sequence[int] = SPP_LEVELS) -> Tensor:
    """Pyramid-pool windows of several maps with one `roi_pool` call (`_roi_pool_batch`):
    `fmaps` are `[C, H_i, W_i]` maps of any sizes, `windows` int64 `[N, 5]` rows `(map index,
    x1, y1, x2, y2)` inside their own map. The maps are laid side by side on one zero canvas and
    each window is shifted with its map (a window never leaves its map, so the bins are those of
    `spp_pool` on each map); fp16 maps are pooled in fp32. One call instead of one per map: a
    fine-tuning step of SPP-net pools 128 windows from about 32 maps (4 images x 8 scales), and
    the canvas holds their cells with little padding, where a batch padded to the largest map
    would hold each small map at the size of the largest."""
    levels = tuple(int(n) for n in levels)
    channels = fmaps[0].shape[0]
    if len(windows) == 0:
        return fmaps[0].new_zeros((0, spp_output_size(channels, levels)), dtype=torch.float32)
    widths = torch.tensor([m.shape[2] for m in fmaps])
    left = torch.cumsum(widths, 0) - widths                   # each map's first canvas column
    height = max(m.shape[1] for m in fmaps)
    dtype = torch.float32 if fmaps[0].dtype in (torch.float16, torch.bfloat16) else fmaps[0].dtype
    canvas = fmaps[0].new_zeros((1, channels, height, int(widths.sum())), dtype=dtype)
    for fmap, x0 in zip(fmaps, left.tolist()):
        canvas[0, :, :fmap.shape[1], x0:x0 + fmap.shape[2]] = fmap
    shift = left.to(windows.device)[windows[:, 0]]
    rois = torch.stack([torch.zeros_like(shift), windows[:, 1] + shift, windows[:, 2],
                        windows[:, 3] + shift, windows[:, 4]], 1)
    return _roi_pool_batch(canvas, rois, levels)


class SpatialPyramidPool(nn.Module):
    """`spp_pool` as a module: `forward(fmap [C, H, W], windows [N, 4]) -> [N, C * sum(n*n)]`."""

    def __init__(self, levels: Sequence[int] = SPP_LEVELS) -> None:
        super().__init__()
        self.levels = tuple(int(n) for n in levels)

    def output_size(self, channels: int) -> int:
        """Pooled vector length for a map with `channels` channels."""
        return spp_output_size(channels, self.levels)

    def forward(self, fmap: Tensor, windows: Tensor) -> Tensor:
        return spp_pool(fmap, windows, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"
