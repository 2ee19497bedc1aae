"""The regions that pre-training classifies, and their crops.

Every region (a ground-truth object, a jittered copy of one, or a background proposal) is cut
twice: R-CNN's warp at the net's crop size, and a square crop with real image context around the
box for the SPP head (`context_box_side` for the box, `context_margin` of real pixels on each
side; with `TrainSettings.pretrain_aspect` the box keeps its shape in it,
`aspect_context_squares`). On a small dataset the crops are held in memory as fp16, each cut
when first needed: an epoch that sees every region once needs only one of its two crops, so a
draw used for one epoch cuts half of them (`PretrainCrops.cut`). When they would not fit
`TrainSettings.pretrain_crop_memory` (VOC2007 with the `paper` preset: ~150 000 regions, some
130 GB) only the boxes are kept and each minibatch's crops are cut from the images when it is
drawn. Every way gives the same pixels, so training does not depend on which one ran.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from detection.backbones import DetectorNet
from detection.boxes import apply_deltas, pixel_iou
from detection.rcnn_warp import warp_images, warp_regions

if TYPE_CHECKING:
    from detection.train import TrainImage, TrainSettings

GIB = 2 ** 30
CUT_GROUP = 16      # images whose crops are cut in one call


def context_box_side(crop_size: int) -> int:
    """Side of the box in the SPP head's context crops as stored: 0.8 of the R-CNN warp size
    (the pre-training sizes of the box are 0.65 and 0.8 of it, so the crops are never enlarged
    much)."""
    return int(round(crop_size * 0.8))


def context_margin(box_side: int, context: float) -> int:
    """Pixels of real context on each side of a box of `box_side` pixels."""
    return int(round(box_side * context))


def aspect_context_squares(boxes: Tensor, box_side: int, context_side: int
                           ) -> tuple[Tensor, Tensor]:
    """Context crops that keep each box's shape, as SPP-net's test pools a box inside its image
    (R-CNN's warps squash it to a square). For boxes `[N, 4]` (0-based inclusive pixels), the
    square image regions `[N, 4]` (the same form) that, warped to `context_side` pixels, show
    the box at an isotropic scale where its area is `box_side`**2 (the test's rule for the
    scale of a box), shrunk where its longer side would leave less than half of the margin
    around it, centred; and the box's place in that crop, `[N, 4]` pixel edges `(x1, y1, x2,
    y2)`."""
    b = boxes.to(torch.float32)
    size = (b[:, 2:] - b[:, :2] + 1).clamp(min=1)                    # w, h in pixels
    margin = (context_side - box_side) / 2
    longest = box_side + margin                                     # half the margin left
    scale = torch.minimum(box_side / size.prod(1).sqrt(), longest / size.amax(1))
    centre = (b[:, :2] + b[:, 2:] + 1) / 2                          # pixel edges
    half = (context_side / 2) / scale
    squares = torch.cat([centre - half[:, None], centre + half[:, None] - 1], dim=1)
    shown = size * scale[:, None] / 2
    place = torch.cat([context_side / 2 - shown, context_side / 2 + shown], dim=1)
    return squares, place


def jitter_boxes(boxes: Tensor, count: int, rng: np.random.Generator,
                 min_iou: float = 0.6) -> tuple[Tensor, Tensor]:
    """Up to `count` random shifts and rescalings of each box `[G, 4]` with IoU >= `min_iou` to
    it; returns the boxes and the index of the box each came from."""
    if len(boxes) == 0 or count == 0:
        return boxes.new_zeros((0, 4)), torch.zeros(0, dtype=torch.int64)
    owner = torch.arange(len(boxes)).repeat_interleave(count * 3)      # sorted: 3x the tries
    deltas = torch.as_tensor(rng.normal(0, [0.12, 0.12, 0.18, 0.18], (len(owner), 4)),
                             dtype=torch.float32)
    moved = apply_deltas(boxes[owner], deltas)
    ok = pixel_iou(moved, boxes)[torch.arange(len(moved)), owner] >= min_iou
    moved, owner = moved[ok], owner[ok]
    rank = torch.arange(len(owner)) - torch.searchsorted(owner, owner)
    return moved[rank < count], owner[rank < count]


class PretrainCrops:
    """The pre-training regions `[M]` (`labels`, `boxes`, `image_index`) and their two crops,
    fp16-rounded and preprocessed: `batch(idx)` gives `[B, 3, S, S]` R-CNN warps (S: the warp
    size) or `[B, 3, T, T]` context crops, from memory (cut there when first asked for) or cut
    from the images."""

    def __init__(self, net: DetectorNet, images: Sequence[TrainImage], boxes: Tensor,
                 labels: Tensor, image_index: Tensor, context: float, memory_gib: float,
                 progress: Callable[[Iterable], Iterable] | None = None,
                 aspect: bool = False) -> None:
        self.net, self.images, self.progress = net, images, progress
        self.boxes, self.labels, self.image_index = boxes, labels, image_index
        self.box_side = context_box_side(net.crop_size)
        self.margin = context_margin(self.box_side, context)
        self.context_side = self.box_side + 2 * self.margin
        # where each box lies in its context crop (pixel edges): the middle square, or with
        # `aspect` its own shape (`aspect_context_squares`)
        self.aspect = aspect
        if aspect:
            self._squares, self.places = aspect_context_squares(boxes, self.box_side,
                                                                self.context_side)
        else:
            self._squares = None
            inner = torch.tensor([self.margin, self.margin, self.context_side - self.margin,
                                  self.context_side - self.margin], dtype=torch.float32)
            self.places = inner.expand(len(boxes), 4)
        self.in_memory = self.nbytes() <= memory_gib * GIB
        self._crops = self._context = self._ready = None
        if self.in_memory:
            # the pages of a crop are touched only when it is cut: a half-cut draw holds half
            self._crops = torch.empty((len(self), 3, net.crop_size, net.crop_size),
                                      dtype=torch.half)
            self._context = torch.empty((len(self), 3, self.context_side, self.context_side),
                                        dtype=torch.half)
            self._ready = torch.zeros((2, len(self)), dtype=torch.bool)   # warp, context

    def __len__(self) -> int:
        return len(self.labels)

    def nbytes(self) -> int:
        """Bytes that both crops of every region take as fp16."""
        return len(self) * 3 * (self.net.crop_size ** 2 + self.context_side ** 2) * 2

    def cut(self, warps: Tensor, contexts: Tensor) -> None:
        """Cut into memory the R-CNN warps of the regions `warps` and the context crops of the
        regions `contexts`, those not there yet. Images are cut in groups of `CUT_GROUP`, so that
        the warps of a group run on all of torch's threads."""
        if not self.in_memory:
            return
        need = torch.zeros_like(self._ready)
        need[0, warps], need[1, contexts] = True, True
        need &= ~self._ready
        rows_needed = torch.nonzero(need.any(0)).flatten()
        if len(rows_needed) == 0:
            return
        images = self.image_index[rows_needed].unique().tolist()
        groups = [images[k:k + CUT_GROUP] for k in range(0, len(images), CUT_GROUP)]
        for group in (self.progress or (lambda x: x))(groups):
            in_group = torch.isin(self.image_index, torch.tensor(group))
            with torch.inference_mode():
                pre = {i: self.net.preprocess(self.images[i].pixels) for i in group}
                for kind, (store, side) in enumerate((
                        (self._crops, self.net.crop_size), (self._context, self.context_side))):
                    rows = torch.nonzero(need[kind] & in_group).flatten()   # in image order
                    if len(rows) == 0:
                        continue
                    owner = self.image_index[rows]
                    regions, margin = self._regions(rows, context=kind == 1)
                    pairs = [(pre[i], regions[owner == i]) for i in group
                             if bool((owner == i).any())]
                    store[rows] = warp_images(pairs, side, margin).half().cpu()
            self._ready[:, in_group] |= need[:, in_group]

    def _cut(self, image: int, rows: Tensor, kinds: Sequence[bool] = (False, True)
             ) -> list[Tensor]:
        """The crops of the regions `rows` of one image, fp16 on the CPU: for each of `kinds`,
        the context crops (True) or the R-CNN warps (False)."""
        with torch.inference_mode():
            pre = self.net.preprocess(self.images[image].pixels)     # on the net's device
            out = []
            for context in kinds:
                regions, margin = self._regions(rows, context)
                side = self.context_side if context else self.net.crop_size
                out.append(warp_regions(pre, regions, side, margin).half().cpu())
            return out

    def _regions(self, rows: Tensor, context: bool) -> tuple[Tensor, float | None]:
        """What to warp for the regions `rows`, and the context in crop pixels to add around
        it: for R-CNN's warps the boxes with R-CNN's context (None); for the context crops the
        boxes with `margin` pixels, or with `aspect` their even-scaled squares as they are."""
        if not context:
            return self.boxes[rows], None
        if self.aspect:
            return self._squares[rows], 0.0
        return self.boxes[rows], self.margin

    def batch(self, idx: Tensor, context: bool = False) -> Tensor:
        """The R-CNN warps (or with `context`, the context crops) of the regions `idx`, in that
        order, as fp32 on the CPU."""
        if self.in_memory:
            none = idx[:0]
            self.cut(none if context else idx, idx if context else none)
            return (self._context if context else self._crops)[idx].float()
        side = self.context_side if context else self.net.crop_size
        out = torch.empty((len(idx), 3, side, side))
        owners = self.image_index[idx]
        for image in owners.unique().tolist():
            at = torch.nonzero(owners == image).flatten()
            out[at] = self._cut(image, idx[at], (context,))[0].float()
        return out


def pretrain_crops(net: DetectorNet, images: Sequence[TrainImage], settings: TrainSettings,
                   rng: np.random.Generator,
                   progress: Callable[[Iterable], Iterable] | None = None) -> PretrainCrops:
    """The regions of every image: its ground-truth objects, `settings.pretrain_jitters`
    jittered copies of each (IoU >= 0.6) and `settings.pretrain_background` background
    proposals (IoU < 0.3), ground truth first; with their crops (`PretrainCrops`)."""
    boxes, labels, owners = [], [], []
    for i, item in enumerate(images):
        r = item.regions
        gt = r.gt_class > 0
        gt_boxes, gt_labels = r.boxes[gt], r.gt_class[gt]
        jittered, owner = jitter_boxes(gt_boxes, settings.pretrain_jitters, rng)
        background = torch.nonzero((r.gt_class == 0) & (r.best_iou < 0.3)).flatten().numpy()
        if len(background):
            background = rng.choice(background, min(len(background),
                                                    settings.pretrain_background), replace=False)
        found = torch.cat([gt_boxes, jittered,
                           r.boxes[torch.as_tensor(background, dtype=torch.long)]])
        boxes.append(found.float())
        labels.append(torch.cat([gt_labels, gt_labels[owner],
                                 torch.zeros(len(background), dtype=torch.int64)]))
        owners.append(torch.full((len(found),), i, dtype=torch.int64))
    cat = (lambda parts, empty: torch.cat(parts) if parts else empty)
    return PretrainCrops(net, images, cat(boxes, torch.zeros((0, 4))),
                         cat(labels, torch.zeros(0, dtype=torch.int64)),
                         cat(owners, torch.zeros(0, dtype=torch.int64)),
                         settings.pretrain_context, settings.pretrain_crop_memory, progress,
                         aspect=settings.pretrain_aspect)
