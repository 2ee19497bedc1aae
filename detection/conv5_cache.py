"""SPP-net's conv5 feature cache: every training image's conv5 maps at every training scale,
computed once and stored on disk as fp16 (one `.pt` file per image, written atomically, so a
stopped run resumes), the paper's cache that lets fine-tuning, the SVMs and box regression run
without the conv layers.

The maps of a whole split do not always fit in memory: VOC2007 trainval with the `paper` preset
at its 5 scales is about 8.6 MB per image, 43 GB in all (twice that when fine-tuning also reads
the maps of the flipped images). `Conv5Cache` therefore keeps the first images' maps in memory
up to a budget and reads the others from their files when they are drawn (one fine-tuning step
reads a few images, ~10 ms each); the numbers are the same either way, only where they come
from differs.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from data.atomic import atomic_write
from data.errors import SppnetError
from detection.memory import release_now_and_then

GIB = 1024 ** 3


def entry_path(folder: Path, image_id: str) -> Path:
    """The cache file of one image (a hash of its id: ids may hold any character)."""
    return folder / f"{hashlib.sha1(image_id.encode()).hexdigest()[:16]}.pt"


def read_entry(path: Path, scales: int) -> list[Tensor] | None:
    """The maps stored in `path`, or None when it is missing, damaged or of another scale set."""
    if not path.is_file():
        return None
    try:
        maps = torch.load(path, weights_only=True)["maps"]
    except Exception:  # damaged entry (a file is only replaced whole, but disks fail)
        return None
    if not isinstance(maps, list) or len(maps) != scales:
        return None
    return maps


class Conv5Cache(Sequence[list[Tensor]]):
    """`cache[i]`: the fp16 `[C, h, w]` maps of image i, one per scale, from memory when it
    was kept there, else read from its file. `select` gives a view on some of the images."""

    def __init__(self, paths: Sequence[Path], scales: int, held: dict[int, list[Tensor]]):
        self._paths = list(paths)
        self._scales = scales
        self._held = held

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> list[Tensor]:  # type: ignore[override]
        if index < 0:
            index += len(self)
        if index in self._held:
            return self._held[index]
        maps = read_entry(self._paths[index], self._scales)
        if maps is None:
            raise SppnetError(f"{self._paths[index]}: conv5 cache entry missing or damaged "
                              f"during training (run the command again to recompute it)")
        return maps

    def __iter__(self) -> Iterator[list[Tensor]]:
        return (self[i] for i in range(len(self)))

    @property
    def held(self) -> int:
        """How many images' maps are in memory."""
        return len(self._held)

    def select(self, indices: Sequence[int]) -> "Conv5Cache":
        """The images at `indices`, in that order (memory shared with this cache)."""
        indices = [int(i) for i in indices]
        return Conv5Cache([self._paths[i] for i in indices], self._scales,
                          {k: self._held[i] for k, i in enumerate(indices) if i in self._held})


def build_conv5_cache(compute: Callable[[int], Sequence[Tensor]], image_ids: Sequence[str],
                      folder: Path, scales: int,
                      memory_gib: float, quiet: bool = False,
                      desc: str = "conv5 cache") -> Conv5Cache:
    """Make sure every image has its entry in `folder` (`compute(i)` gives image i's maps when
    it has none) and return the cache, holding images in memory while their maps fit
    `memory_gib`."""
    folder.mkdir(parents=True, exist_ok=True)
    budget = memory_gib * GIB
    used = 0
    paths, held = [], {}
    computed = 0
    bar = tqdm(image_ids, desc=desc, file=sys.stderr, disable=quiet,
               dynamic_ncols=True, leave=False)
    for i, image_id in enumerate(bar):
        path = entry_path(folder, image_id)
        maps = read_entry(path, scales)
        if maps is None:
            maps = [m.half().cpu() for m in compute(i)]
            atomic_write(path, lambda f, m=maps: torch.save({"maps": m}, f))
            computed += 1
            release_now_and_then(computed)  # the conv's freed buffers, pinned by the held maps
        size = sum(m.numel() * m.element_size() for m in maps)
        if used + size <= budget:
            held[i] = maps
            used += size
        paths.append(path)
    return Conv5Cache(paths, scales, held)
