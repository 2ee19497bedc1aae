"""Selective search proposals via opencv-contrib's `cv2.ximgproc.segmentation`, as R-CNN used them.

What: `selective_search(image, settings)` returns up to `settings.max_proposals` boxes of one RGB
image, best ranked first, as float32 `[N, 4]` 0-based pixel-inclusive `(x1, y1, x2, y2)` (an OpenCV
rect `(x, y, w, h)` is the box `(x, y, x + w - 1, y + h - 1)`, the VOC reader's convention), with
exact duplicates removed and boxes narrower or lower than `settings.min_size` dropped.

How, as R-CNN's `selective_search_boxes.m`:
- fast mode (default: HSV and Lab colour spaces, two similarity strategies, Felzenszwalb-
  Huttenlocher segmentations with k = 50, 100, 150; R-CNN's fast mode used k = 50 and 100, and
  OpenCV always adds a third) or quality mode (five colour spaces, k = 50 ... 250, four
  strategies). OpenCV's own default k = 150, 300, 450 gives about half the boxes (~1000 on a
  500x375 photo instead of R-CNN's ~2000) and misses small objects: measured on three real
  photos and their mirror images (30 hand-drawn boxes), recall@0.5 0.87 with it and 0.97 with
  k = 50, for 7-13% more time;
- an image whose longer side exceeds `settings.max_side` (default 500 px, R-CNN's demo width; VOC
  photos are at most 500 px so they are searched at full size) is searched on a downscaled copy
  and the boxes are scaled back and clipped to the image; `min_size` is measured on the searched
  copy, as in R-CNN (20 px);
- the top `max_proposals` boxes in OpenCV's ranking order are kept.

Determinism (see DESIGN.md, pitfalls): OpenCV ranks regions with `level * rand()` of the C
library, a process-wide RNG that `cv2.setRNGSeed` does not reach. We seed it with `srand(seed)`
through ctypes right before each image, under a process-wide lock, so that the same image and
settings give the same boxes whatever ran before in the process (other images, other `rand()`
users) and however the work is split over processes or machines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from data.errors import SppnetError

__all__ = ["ProposalSettings", "selective_search", "timed_selective_search", "search_image_size",
           "rects_to_boxes", "check_seeding", "ALGORITHM_VERSION"]

#: Bumped whenever the post-processing of OpenCV's rects changes: part of `ProposalSettings.key`.
ALGORITHM_VERSION = 1

_MODES = ("fast", "quality")


@dataclass(frozen=True)
class ProposalSettings:
    """Everything that determines the proposals of an image (and so the cache key).

    mode:          "fast" (R-CNN's and SPP-net's choice) or "quality" (slower, more boxes).
    max_proposals: keep at most this many boxes, best ranked first (R-CNN: ~2000).
    min_size:      drop boxes narrower or lower than this, in pixels of the searched image.
    max_side:      search on a copy whose longer side is at most this (None: full size).
    k, k_step, sigma: Felzenszwalb-Huttenlocher parameters, OpenCV's (base_k, inc_k, sigma):
                   segmentations at k, k + k_step, k + 2 k_step (quality mode: up to + 4 k_step).
    seed:          the value given to the C library's `srand` before each image.
    """

    mode: str = "fast"
    max_proposals: int = 2000
    min_size: int = 20
    max_side: int | None = 500
    k: int = 50
    k_step: int = 50
    sigma: float = 0.8
    seed: int = 1

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise SppnetError(f"proposal mode {self.mode!r}: expected one of {', '.join(_MODES)}")
        if int(self.max_proposals) < 1:
            raise SppnetError(f"max proposals {self.max_proposals}: must be at least 1")
        if int(self.min_size) < 0:
            raise SppnetError(f"min box size {self.min_size}: must not be negative")
        if self.max_side is not None and int(self.max_side) < 16:
            raise SppnetError(f"max side {self.max_side}: must be at least 16 px (or None)")
        if int(self.k) < 1 or int(self.k_step) < 0 or not float(self.sigma) > 0:
            raise SppnetError(f"segmentation parameters k={self.k}, k_step={self.k_step}, "
                              f"sigma={self.sigma}: need k >= 1, k_step >= 0, sigma > 0")
        if not 0 <= int(self.seed) < 2**32:
            raise SppnetError(f"seed {self.seed}: must be in [0, 2**32)")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        return asdict(self)

    def key(self) -> str:
        """A stable 16-hex-digit hash of the settings and ALGORITHM_VERSION (not Python's
        `hash`, which changes between processes): names cache folders."""
        payload = json.dumps({"algorithm": ALGORITHM_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# OpenCV and the C library


_SS_LOCK = threading.Lock()  # the C library's rand() state is process-wide
_libc: Any = None
_checked = False


def _ximgproc() -> Any:
    """`cv2.ximgproc.segmentation`, or a clear error naming the fix."""
    try:
        import cv2
    except ImportError as exc:
        raise SppnetError(f"OpenCV is not installed ({exc}): pip install "
                          f"opencv-contrib-python-headless") from None
    segmentation = getattr(getattr(cv2, "ximgproc", None), "segmentation", None)
    if segmentation is None:
        raise SppnetError(
            "cv2.ximgproc is missing: selective search needs OpenCV's contrib modules. Install "
            "exactly one OpenCV: pip uninstall -y opencv-python opencv-python-headless "
            "opencv-contrib-python opencv-contrib-python-headless && pip install "
            "opencv-contrib-python-headless")
    return segmentation


def _load_libc() -> Any:
    """The C library whose `srand` seeds OpenCV's `rand()`, found portably (cached)."""
    global _libc
    if _libc is not None:
        return _libc
    names: list[str | None] = []
    if sys.platform == "win32":
        names += ["ucrtbase", "msvcrt", ctypes.util.find_library("c")]
    else:
        names += [ctypes.util.find_library("c"), "libc.so.6", "libc.dylib", None]
    tried = []
    for name in names:
        if name is None and sys.platform == "win32":
            continue
        try:
            lib = ctypes.CDLL(name)  # None: the symbols already loaded in this process
            srand, rand = lib.srand, lib.rand
        except (OSError, AttributeError) as exc:
            tried.append(f"{name or 'process symbols'} ({exc})")
            continue
        srand.argtypes, srand.restype = [ctypes.c_uint], None
        rand.argtypes, rand.restype = [], ctypes.c_int
        _libc = lib
        return lib
    raise SppnetError("cannot find the C library's srand() to make selective search "
                      "deterministic (OpenCV ranks proposals with rand()); tried: "
                      + "; ".join(tried or ["nothing found"]))


def _run_opencv(bgr: np.ndarray, settings: ProposalSettings) -> np.ndarray:
    """OpenCV's ranked rects `[M, 4]` (x, y, w, h) of a BGR uint8 image, seeded, under the lock."""
    segmentation = _ximgproc()
    libc = _load_libc()
    search = segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(bgr)
    if settings.mode == "fast":
        search.switchToSelectiveSearchFast(int(settings.k), int(settings.k_step),
                                           float(settings.sigma))
    else:
        search.switchToSelectiveSearchQuality(int(settings.k), int(settings.k_step),
                                              float(settings.sigma))
    with _SS_LOCK:
        libc.srand(int(settings.seed))
        rects = search.process()
    return np.asarray(rects, dtype=np.int64).reshape(-1, 4)


def check_seeding() -> None:
    """Once per process: check that seeding reaches OpenCV's RNG (the same noise image twice,
    with other `rand()` use in between, must give the same ranking)."""
    global _checked
    if _checked:
        return
    blocks = np.random.default_rng(0).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    noise = np.ascontiguousarray(np.kron(blocks, np.ones((4, 4, 1), dtype=np.uint8)))  # ~90 rects
    probe = ProposalSettings(max_side=None)
    first = _run_opencv(noise, probe)
    _load_libc().rand()
    second = _run_opencv(noise, probe)
    if not np.array_equal(first, second):
        raise SppnetError("seeding the C library's rand() does not make OpenCV's selective "
                          "search deterministic in this process (OpenCV may link another C "
                          "library); proposals would change from run to run")
    _checked = True


# --------------------------------------------------------------------------------------------
# Pure helpers


def search_image_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) of the copy that is searched: the longer side capped at `max_side`,
    the aspect ratio kept, never upscaled."""
    longest = max(width, height)
    if max_side is None or longest <= max_side:
        return int(width), int(height)
    scale = max_side / longest
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def rects_to_boxes(rects: np.ndarray, searched: tuple[int, int], original: tuple[int, int],
                   min_size: int, max_proposals: int) -> np.ndarray:
    """OpenCV rects `[M, 4]` (x, y, w, h) on the searched image -> float32 boxes `[N, 4]`
    `(x1, y1, x2, y2)` 0-based, pixel-inclusive, on the original image.

    Rects under `min_size` (width or height, searched pixels) are dropped first; the pixel span
    `[x, x + w)` is then scaled by original / searched per axis, so the box is
    `(x * sx, y * sy, (x + w) * sx - 1, (y + h) * sy - 1)`, clipped to the image; exact
    duplicates are removed keeping the first (best ranked); at most `max_proposals` are kept,
    in rank order.
    """
    rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    rects = rects[(rects[:, 2] >= min_size) & (rects[:, 3] >= min_size)]
    (sw, sh), (ow, oh) = searched, original
    scale = np.array([ow / sw, oh / sh, ow / sw, oh / sh])
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1) * scale
    boxes[:, 2:] -= 1.0
    boxes = np.clip(boxes, 0.0, np.array([ow - 1, oh - 1, ow - 1, oh - 1], dtype=np.float64))
    boxes = boxes.astype(np.float32)
    if len(boxes):
        _, first = np.unique(boxes, axis=0, return_index=True)
        boxes = boxes[np.sort(first)]
    return np.ascontiguousarray(boxes[:max_proposals])


# --------------------------------------------------------------------------------------------
# Public entry point


def selective_search(image: np.ndarray, settings: ProposalSettings | None = None) -> np.ndarray:
    """Selective search proposals of one image.

    Args:
        image: RGB uint8 array `[H, W, 3]` (as `data.images.load_image` returns it).
        settings: see `ProposalSettings` (defaults: fast mode, 2000 boxes, min 20 px, 500 px).

    Returns:
        float32 `[N, 4]` boxes `(x1, y1, x2, y2)`, 0-based pixel-inclusive, best ranked first,
        N <= max_proposals. The same image and settings always give the same array.

    Raises:
        SppnetError: cv2.ximgproc missing, or the C library's RNG cannot be seeded.
    """
    settings = settings or ProposalSettings()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} "
                         f"{image.shape}")
    height, width = image.shape[:2]
    import cv2

    check_seeding()
    size = search_image_size(width, height, settings.max_side)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    if size != (width, height):
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    rects = _run_opencv(bgr, settings)
    return rects_to_boxes(rects, size, (width, height), int(settings.min_size),
                          int(settings.max_proposals))


def timed_selective_search(image: np.ndarray,
                           settings: ProposalSettings | None = None) -> tuple[np.ndarray, float]:
    """`selective_search` and its wall time in seconds (for per-image timing)."""
    start = time.perf_counter()
    boxes = selective_search(image, settings)
    return boxes, time.perf_counter() - start
